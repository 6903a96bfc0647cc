"""The embedded LLaVA-architecture model: a small CLIP vision tower and a small Llama language model with GQA.

`build_random_llava` is the stand-in used until the trained checkpoint exists (and by tests): a real
`LlavaForConditionalGeneration` built from its config with seeded random weights, nothing downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlcache.zoo.processor import IMAGE_SIZE, IMAGE_TOKEN, PATCH_SIZE, build_processor


@dataclass
class TinyLlavaSpec:
    """Sizes of the embedded model; the defaults are the random stand-in's (fast on a 2-core CPU)."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_intermediate: int | None = None  # None: 2 x vision_hidden
    max_positions: int = 8192


# The trained embedded model (vlcache/zoo/checkpoint, vlcache/zoo/train.py): small enough that the demo
# sweep runs on a 2-core CPU, deep enough (6 layers, GQA 6:2) that per-layer budgets matter.
TRAINED_SPEC = TinyLlavaSpec(
    hidden=192,
    layers=6,
    heads=6,
    kv_heads=2,
    intermediate=640,
    vision_hidden=128,
    vision_layers=3,
    vision_heads=4,
    vision_intermediate=512,
)


def tiny_llava_config(spec: TinyLlavaSpec, vocab_size: int, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_random_llava(seed: int = 0, spec: TinyLlavaSpec | None = None):
    """Returns (model, processor): seeded random weights, float32, eval mode."""
    processor = build_processor()
    tok = processor.tokenizer
    config = tiny_llava_config(
        spec or TinyLlavaSpec(), len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor
