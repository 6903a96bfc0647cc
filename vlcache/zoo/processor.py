"""The embedded model's processor: a character-level tokenizer, CLIP image preprocessing, LLaVA-1.5 chat format.

A character vocabulary keeps the embedding table tiny and covers every string the synthetic tasks produce
(form values, captions, counts), so the embedded model can be small enough to ship in the repository.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

IMAGE_SIZE = 336
PATCH_SIZE = 14
IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"

# LLaVA-1.5's conversation format: images first, then the question, then the answer. With several images
# each is labelled "Image k: " (as multi-image LLaVA prompts do), so that the model can name the k-th image.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% set n = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% set ns = namespace(i=0) %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{% set ns.i = ns.i + 1 %}"
    "{% if n > 1 %}Image {{ ns.i }}: {% endif %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per printable ASCII character, plus the special tokens."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", ignore_merges=True))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_processor():
    """A `LlavaProcessor` with LLaVA-1.5 geometry: 336 px images, 14 px patches, CLS dropped, so 576 image
    tokens per image."""
    # imported here: the tokenizer alone (the training script's need) works on older transformers too
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
