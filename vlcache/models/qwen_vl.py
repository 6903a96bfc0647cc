"""Qwen2-VL and Qwen2.5-VL: a variable number of image tokens per image, vision start/end tokens, 3-D M-RoPE.

An image of `t x h x w` patches becomes `t·h·w / merge²` `<|image_pad|>` tokens, wrapped by the chat template
in `<|vision_start|> ... <|vision_end|>`. Image tokens are the pads (their keys hold the image); the start and
end markers are text tokens, and the post-vision start (VL-Cache's `v`) is the first position after the last
image's `<|vision_end|>`, where the question begins.

Positions: M-RoPE gives every prompt token a (temporal, height, width) triple; text tokens have three equal
components, image tokens their grid coordinates offset by the text before them. An image of `h x w` merged
tokens advances the position by `max(h, w)`, not by its token count, so a prompt's next position is its
length plus `rope_deltas` (negative), which transformers keeps from prefill. The adapter computes the prompt's
`[3, B, m]` positions with the model's own `get_rope_index` and returns `length + rope_delta` as each
sequence's first decode position; decode positions are 1-D (`[B, 1]`; the text model expands them to three
equal components), so decoding after compression goes on from the original positions whatever the cache
keeps. StreamingLLM's `rolling` decode (re-rotating keys) is 1-D only and refuses M-RoPE.
"""

from __future__ import annotations

import torch

from vlcache.models.adapter import VLMAdapter
from vlcache.models.prompt import PromptInfo


class Qwen2VLAdapter(VLMAdapter):
    """`Qwen2VLForConditionalGeneration` (Qwen2-VL-7B-Instruct: 28 layers, GQA 28:4)."""

    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"

    def __init__(self, model, processor, device=None) -> None:
        super().__init__(model, processor, device)
        self.vision_start_token_id = model.config.vision_start_token_id
        self.vision_end_token_id = model.config.vision_end_token_id

    @property
    def image_marker(self) -> str:
        """What Qwen's chat template writes for one image: its pad token between the vision start and end."""
        return f"<|vision_start|>{self.processor.image_token}<|vision_end|>"

    def prompt_info(self, inputs: dict[str, torch.Tensor]) -> PromptInfo:
        return PromptInfo.from_ids(
            inputs["input_ids"], inputs["attention_mask"], self.image_token_id,
            closing_token_id=self.vision_end_token_id,
        )

    def mm_token_type_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """0 text, 1 image (the processor returns it; rebuilt from the ids when missing)."""
        types = inputs.get("mm_token_type_ids")
        if types is None:
            types = (inputs["input_ids"] == self.image_token_id).int()
        return types

    def positions(self, inputs: dict[str, torch.Tensor], info: PromptInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """`[3, B, m]` M-RoPE positions (the model's `get_rope_index`, padding at 0) and `length + rope_delta`."""
        rope = {"image_grid_thw": inputs.get("image_grid_thw")}
        position_ids, deltas = self.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=self.mm_token_type_ids(inputs),
            attention_mask=inputs["attention_mask"], **rope,
        )
        return position_ids, info.lengths + deltas.reshape(-1).to(info.lengths.device)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):  # noqa: N801 - transformers' spelling of the family
    """`Qwen2_5_VLForConditionalGeneration` (Qwen2.5-VL-7B-Instruct: windowed vision attention, same M-RoPE)."""

    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
