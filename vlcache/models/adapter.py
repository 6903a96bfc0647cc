"""Model adapters: how a VLM family builds prompts, marks image tokens, and runs prefill and one decode step.

The adapter wires the framework's attention function into the language model only, and passes explicit
positions, so that decoding continues from each sequence's original prompt length however many entries the
cache keeps.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlcache.engine.attention import use_vlcache_attention
from vlcache.models.prompt import PromptInfo


class PromptTooLong(ValueError):
    """A prompt (plus the tokens to generate) longer than the model's position range."""


class LlavaAdapter:
    """llava-hf `LlavaForConditionalGeneration` (LLaVA-1.5 and the embedded model): one image-token id, 1-D RoPE."""

    def __init__(self, model, processor, device: str | torch.device = "cpu") -> None:
        self.model, self.processor, self.device = model, processor, torch.device(device)
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

    def chat_prompt(self, question: str, num_images: int) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def build_inputs(
        self, questions: list[str], images: list[list[Image.Image]], max_new_tokens: int = 0
    ) -> dict[str, torch.Tensor]:
        """Left-padded inputs for a batch: images first, then the question (LLaVA's prompt format).

        Raises `PromptTooLong` when a prompt plus its answer would run past the model's positions."""
        texts = [self.chat_prompt(q, len(ims)) for q, ims in zip(questions, images)]
        flat = [im.convert("RGB") for ims in images for im in ims]
        self.processor.tokenizer.padding_side = "left"
        batch = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        limit = self.text_config.max_position_embeddings
        lengths = batch["attention_mask"].sum(1) + max_new_tokens
        if int(lengths.max()) > limit:
            raise PromptTooLong(
                f"prompt of {int(lengths.max()) - max_new_tokens} tokens + {max_new_tokens} new tokens exceeds "
                f"the model's {limit} positions"
            )
        return {k: v.to(self.device) for k, v in batch.items()}

    def prompt_info(self, inputs: dict[str, torch.Tensor]) -> PromptInfo:
        return PromptInfo.from_ids(inputs["input_ids"], inputs["attention_mask"], self.image_token_id)

    def prefill(self, inputs: dict[str, torch.Tensor], info: PromptInfo, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the whole prompt; returns the last position's logits `[B, vocab]` and the first decode
        position `[B]` of each sequence (its prompt length: decoding never counts the cache's entries)."""
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = self.model(
            input_ids=inputs["input_ids"],
            position_ids=info.position_ids(),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return out.logits[:, -1], info.lengths.clone()

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One step for `[B]` tokens at `[B]` positions; returns `[B, vocab]` logits."""
        out = self.model(
            input_ids=tokens[:, None], position_ids=positions[:, None], past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1]
