"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision: "anyres" images.

An image becomes a base view plus a grid of high-resolution tiles; the processor inserts one image token per
feature the model will place there, and that number varies with the image's size and aspect ratio (the
unpadded tile grid, one row-separator `image_newline` feature per row, and for OneVision a downscale to at
most `anyres_max_9` tiles and one closing newline). The row separators sit at image-token positions too, so an
image's span is still one contiguous run of `image_token_id`: `PromptInfo.from_ids` finds it as for LLaVA-1.5,
and the post-vision start is the first position after the last run. Positions are 1-D RoPE.

The model's forward needs `image_sizes` (and OneVision's `batch_num_images`); the processor returns them and
`VLMAdapter.prefill` passes every processor output through.
"""

from __future__ import annotations

from vlcache.models.adapter import VLMAdapter


class LlavaNextAdapter(VLMAdapter):
    """llava-hf `LlavaNextForConditionalGeneration`: LLaVA-1.6 Mistral-7B (Mistral, GQA 32:8), 34B (Yi-34B)."""

    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"


class LlavaOnevisionAdapter(VLMAdapter):
    """llava-hf `LlavaOnevisionForConditionalGeneration`: SigLIP + Qwen2 (LLaVA-OneVision-7B: GQA 28:4)."""

    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
