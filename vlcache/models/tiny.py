"""Tiny random-weight instances of every supported architecture, built locally from their config classes.

Each comes with a locally built processor: the architecture's own processor class and its PIL image processor
(no torchvision needed), over a character-level tokenizer (the embedded model's idea, vlcache/zoo/processor.py)
that carries the architecture's special tokens (`<image>`, or Qwen's `<|image_pad|>`, `<|vision_start|>`,
`<|vision_end|>`). Geometry is shrunk (28-56 px tiles, 14 px patches) so that a CPU runs a prompt in
milliseconds, but the image-token logic is the real one: anyres tiles, row separators, dynamic resolution,
M-RoPE. For tests (tests/test_models.py) and for the real-size check's token counts.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
QWEN_SPECIALS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def char_tokenizer(named: dict[str, str]) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus `<pad> <s> </s> <unk>` and the `named` special tokens
    (`{"image_token": "<image>"}`: the processor finds them as `tokenizer.image_token` / `image_token_id`)."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", *named.values()]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", ignore_merges=True))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens=dict(named),
    )
    tok.add_special_tokens({"additional_special_tokens": list(named.values())})
    return tok


def chat_template(image: str) -> str:
    """A minimal chat format: images (as the family's placeholder string) first, then the question."""
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image + "\n{% endif %}{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


def image_only(cls):
    """`cls` (a processor with a video processor) without its video processor: video processors need
    torchvision, which CPU machines do not have. Images are processed exactly as by `cls`."""

    class ImageOnly(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


# -- processors (real geometry or tiny, from the same code) -------------------------------------------------
def llava_next_processor(tile: int = 336, patch: int = 14, pinpoints=None):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    pinpoints = pinpoints or [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile],
                              [tile, 3 * tile]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=char_tokenizer({"image_token": "<image>"}), patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template("<image>"),
    )


def onevision_processor(tile: int = 384, patch: int = 14, max_grid: int = 6):
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    pinpoints = [[tile * i, tile * j] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints,
    )
    return image_only(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=char_tokenizer({"image_token": "<image>", "video_token": "<video>"}),
        num_image_tokens=(tile // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=chat_template("<image>"), vision_aspect_ratio="anyres_max_9",
    )


def qwen_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch: int = 14, merge: int = 2):
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch, merge_size=merge, temporal_patch_size=2,
    )
    return image_only(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=char_tokenizer(QWEN_SPECIALS),
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"),
    )


# -- tiny models ----------------------------------------------------------------------------------------------
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
TILE, PATCH = 56, 14


def _ids(tok) -> dict:
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)


def build_tiny(family: str, seed: int = 0):
    """(model, processor) of `family` with seeded random float32 weights, in eval mode on the CPU."""
    if family == "llava":
        from vlcache.zoo.model import build_random_llava

        return build_random_llava(seed)
    torch.manual_seed(seed)
    if family == "llava_next":
        from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

        processor = llava_next_processor(TILE, PATCH)
        tok = processor.tokenizer
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, projection_dim=32),
            text_config=MistralConfig(**TEXT, **_ids(tok), sliding_window=None),
            image_token_id=tok.image_token_id, image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
            vision_feature_layer=-1, vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(config)
    elif family == "llava_onevision":
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            Qwen2Config,
            SiglipVisionConfig,
        )

        processor = onevision_processor(TILE, PATCH, max_grid=3)
        tok = processor.tokenizer
        config = LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2),
            text_config=Qwen2Config(**TEXT, **_ids(tok)),
            image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
            image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
            vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        processor = qwen_processor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 48, patch=PATCH)
        tok = processor.tokenizer
        text = dict(**TEXT, **_ids(tok),
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        special = dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                       vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                       vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        if family == "qwen2_vl":
            from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

            vision = dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2,
                          patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
        else:
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=TEXT["hidden_size"],
                          num_heads=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                          window_size=56, fullatt_block_indexes=[1])
            model = Qwen2_5_VLForConditionalGeneration(
                Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special))
    else:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    return model.eval(), processor
