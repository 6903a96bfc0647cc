"""Model adapters: how a VLM family builds prompts, marks image tokens, and runs prefill and one decode step.

The adapter wires the framework's attention function into the language model only, and passes explicit
positions, so that decoding continues from each sequence's original prompt length however many entries the
cache keeps.

`VLMAdapter` holds what every family shares (the engine's contract: `build_inputs`, `prompt_info`, `prefill`
→ (logits `[B, vocab]`, first decode positions `[B]`), `decode(tokens [B], positions [B], cache)`); a family
overrides only what differs: its model class, how image tokens and the post-vision start are found
(`prompt_info`), and its RoPE positions (`positions`). Families: `llava` here, `llava_next` and
`llava_onevision` in llava_next.py, `qwen2_vl` and `qwen2_5_vl` in qwen_vl.py.
"""

from __future__ import annotations

import contextlib

import torch
from PIL import Image

from vlcache.engine.attention import use_vlcache_attention
from vlcache.models.prompt import PromptInfo

IMAGE_PLACE = "<image>"  # in a question: where one of its images goes (interleaved prompts, e.g. MileBench)


class PromptTooLong(ValueError):
    """A prompt (plus the tokens to generate) longer than the model's position range."""


class VLMAdapter:
    """A llava-hf-style `...ForConditionalGeneration` (vision tower + projector + decoder-only language model).

    `device`: where inputs go; None means the input embedding's device (a model split with `device_map`, whose
    layers, and so their cache layers, live on several devices).

    `fused_prefill`: whether `prefill` runs the language model through the fused prefill
    (vlcache/engine/fused_prefill.py: the same function with transformers' elementwise passes fused). None (the
    default): on CUDA with autograd off, where the model supports it (`prefill_unsupported_reason`); True:
    wherever supported, the CPU included (PyTorch forms there; tests), and an error where not; False: never, the
    model's own forward. Set it on an instance or a subclass to switch it off (or on).

    `prefill_attention`: the prefill's attention kernel, ``auto`` (FlashAttention-4 where installed and able,
    else SDPA), ``sdpa`` or ``fa4`` (vlcache/engine/prefill_attention.py; the job config's `prefill_attention`)."""

    family = ""
    model_class = ""  # the transformers class that loads this family (`load.py`)
    fused_prefill: bool | None = None
    prefill_attention: str = "auto"

    def __init__(self, model, processor, device: str | torch.device | None = None) -> None:
        self.model, self.processor = model, processor
        self.device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
        self.text_config = model.config.text_config
        use_vlcache_attention(self.text_config)
        self.image_token_id = model.config.image_token_id
        self.eos_token_id = processor.tokenizer.eos_token_id
        self.pad_token_id = processor.tokenizer.pad_token_id

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    # -- prompts -------------------------------------------------------------------------------------------
    @property
    def image_marker(self) -> str:
        """The text the processor expands into one image's tokens."""
        return self.processor.image_token
    def chat_prompt(self, question: str, num_images: int) -> str:
        """The chat-template prompt: the images first, then the question; or, when the question names a place
        for each image with `<image>` (lmms-eval's convention for interleaved prompts), each image there."""
        places = question.count(IMAGE_PLACE)
        if places and places != num_images:
            raise ValueError(f"the prompt names {places} {IMAGE_PLACE} places for {num_images} image(s)")
        if places:  # chat templates may gather image items first: the processor's own in-text marker instead
            content = [{"type": "text", "text": question.replace(IMAGE_PLACE, self.image_marker)}]
        else:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def build_inputs(
        self,
        questions: list[str],
        images: list[list[Image.Image]],
        max_new_tokens: int = 0,
        allow_past_positions: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Left-padded inputs for a batch: images first, then the question (or each image at its `<image>`).

        Raises `PromptTooLong` when a prompt plus its answer would run past the model's positions, unless
        `allow_past_positions` (RoPE is computed on the fly past them, as LOOK-M's MileBench runs go)."""
        texts = [self.chat_prompt(q, len(ims)) for q, ims in zip(questions, images)]
        flat = [im.convert("RGB") for ims in images for im in ims]
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        limit = self.text_config.max_position_embeddings
        lengths = batch["attention_mask"].sum(1) + max_new_tokens
        if int(lengths.max()) > limit and not allow_past_positions:
            raise PromptTooLong(
                f"prompt of {int(lengths.max()) - max_new_tokens} tokens + {max_new_tokens} new tokens exceeds "
                f"the model's {limit} positions"
            )
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def prompt_info(self, inputs: dict[str, torch.Tensor]) -> PromptInfo:
        return PromptInfo.from_ids(inputs["input_ids"], inputs["attention_mask"], self.image_token_id)

    # -- positions -----------------------------------------------------------------------------------------
    def positions(self, inputs: dict[str, torch.Tensor], info: PromptInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's position ids as the model's forward takes them, and each sequence's first decode
        position `[B]`. 1-D RoPE: real tokens count from 0 after the left padding; decoding goes on from the
        prompt length, never from the cache's entry count."""
        return info.position_ids(), info.lengths.clone()

    def decode_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """`[B]` decode positions as the model's forward takes them for one new token."""
        return positions[:, None]

    # -- forward -------------------------------------------------------------------------------------------
    def prefill(self, inputs: dict[str, torch.Tensor], info: PromptInfo, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the whole prompt; returns the last position's logits `[B, vocab]` and the first decode
        position `[B]` of each sequence."""
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        position_ids, next_positions = self.positions(inputs, info)
        with self._prefill_forward():
            out = self.model(
                input_ids=inputs["input_ids"],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            )
        return out.logits[:, -1].to(self.device), next_positions.to(self.device)

    def _prefill_forward(self) -> contextlib.AbstractContextManager:
        """The context `prefill` runs the model in: the fused prefill where `fused_prefill` asks for it (see the
        class docstring), else nothing."""
        if self.fused_prefill is False:
            return contextlib.nullcontext()
        if self.fused_prefill is None and not self.model.get_input_embeddings().weight.is_cuda:
            return contextlib.nullcontext()  # the CPU (the embedded default): the model's own forward, unchanged
        if self.fused_prefill is None and torch.is_grad_enabled():
            return contextlib.nullcontext()  # its kernels have no backward: a prefill recording gradients keeps it
        from vlcache.engine.fused_prefill import prefill_unsupported_reason, swapped_forward  # imports triton

        reason = prefill_unsupported_reason(self.model)
        if reason is None:
            return swapped_forward(self.model)
        if self.fused_prefill:
            raise ValueError(f"fused_prefill=True, but the fused prefill cannot run this model: {reason}")
        return contextlib.nullcontext()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One step for `[B]` tokens at `[B]` positions; returns `[B, vocab]` logits."""
        out = self.model(
            input_ids=tokens[:, None], position_ids=self.decode_position_ids(positions), past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1].to(self.device)


class LlavaAdapter(VLMAdapter):
    """llava-hf `LlavaForConditionalGeneration` (LLaVA-1.5 and the embedded model): one image-token id, a fixed
    number of image tokens per image (576 at 336 px), 1-D RoPE."""

    family = "llava"
    model_class = "LlavaForConditionalGeneration"

    def __init__(self, model, processor, device: str | torch.device | None = "cpu") -> None:
        super().__init__(model, processor, device)
