"""LOOK-M's prompt cut: a prompt's context kept to its last `max_len` tokens, images whole.

LOOK-M (Wan et al. 2024) evaluates MileBench with MileBench's own truncation (SUSTechBruce/LOOK-M `utils.py`,
`MileBenchDataset.__getitem__`, the code of MileBench/MileBench `utils.py`; `max_context_len: 4096`,
`n_tokens_per_image: 576` in LOOK-M's `configs/model_configs.yaml` and `13b_model_configs.yaml`). The prompt is
the task instruction, a newline, then the context (text fragments between images). The instruction is kept
whole; the context gets `max_len - tokens(instruction)` tokens (the newline and the chat template are not
counted). The context is walked from its end, chunk by chunk (a text fragment: its tokens by the model's
tokenizer, without special tokens; an image: a fixed number of tokens), keeping chunks while they fit and
stopping at the first that does not. Images are never cut. Only when the context's last chunk is a text that
does not fit is it cut, from the left: its last tokens are kept.

Where this differs from that code: (1) a text fragment kept whole keeps its own characters (LOOK-M decodes every
kept fragment's token ids back to text, which can change its spaces); only a fragment that is cut is decoded.
(2) An instruction of `max_len` tokens or more leaves no room: nothing of the context is kept (LOOK-M's slice
`ids[-budget:]` keeps the whole last fragment when the budget is 0, and all but its first |budget| tokens when it
is negative). (3) `image_tokens` may be each image's own count (the model's), not one constant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

PLACE = "<image>"  # vlcache.models.adapter.IMAGE_PLACE: where an image of the prompt goes in its text
LOOKM_IMAGE_TOKENS = 576  # LOOK-M's n_tokens_per_image: LLaVA-1.5 (336 px, 14 px patches)

Chunk = str | int  # a text fragment, or an image (its index in the prompt's list of images)


@dataclass(frozen=True)
class ContextCut:
    chunks: list[Chunk]  # the kept chunks, in prompt order
    dropped_text_tokens: int  # text tokens of the context not kept (dropped fragments and the cut part)
    dropped_images: int


def cut_context(
    chunks: Sequence[Chunk],
    instruction_tokens: int,
    max_len: int,
    tokenize: Callable[[str], Sequence],
    detokenize: Callable[[Sequence], str],
    image_tokens: int | Callable[[int], int] = LOOKM_IMAGE_TOKENS,
) -> ContextCut:
    """Keeps the longest run of `chunks` ending at the last one that fits in `max_len - instruction_tokens`
    tokens (see the module docstring). `tokenize(text)` gives a fragment's tokens (its length is its count),
    `detokenize(tokens)` the text of a cut fragment's kept tokens; `image_tokens` is the tokens of every image, or
    of image `i` as `image_tokens(i)`."""
    count = image_tokens if callable(image_tokens) else (lambda _i: image_tokens)
    budget = max_len - instruction_tokens
    used, kept, dropped_text = 0, [], 0
    stop = 0  # chunks[:stop] are dropped whole
    for pos in range(len(chunks) - 1, -1, -1):
        chunk = chunks[pos]
        if isinstance(chunk, str):
            ids = list(tokenize(chunk))
            if used + len(ids) > budget:
                if not any(c != "" for c in kept) and chunk:  # the context's last chunk: cut from the left
                    keep = max(budget, 0)
                    kept.append(detokenize(ids[len(ids) - keep :]) if keep else "")
                    dropped_text += len(ids) - keep
                    stop = pos
                else:
                    stop = pos + 1
                break
            kept.append(chunk)
            used += len(ids)
        else:
            n = count(chunk)
            if used + n > budget:
                stop = pos + 1
                break
            kept.append(chunk)
            used += n
    dropped = chunks[:stop]
    dropped_text += sum(len(list(tokenize(c))) for c in dropped if isinstance(c, str))
    return ContextCut(
        chunks=[c for c in reversed(kept) if c != ""],
        dropped_text_tokens=dropped_text,
        dropped_images=sum(1 for c in dropped if not isinstance(c, str)),
    )


def split_context(text: str, num_images: int, place: str = PLACE) -> tuple[list[Chunk], bool]:
    """A context as the model reads it, in chunks: the text split at each `place` (image i at the i-th place,
    as vlcache's adapters put them), or, with no place in the text, the images first (image 0 first) and then
    the text. Also whether the images are in place."""
    places = text.count(place)
    if places and places != num_images:
        raise ValueError(f"the prompt names {places} {place} places for {num_images} image(s)")
    if not places:
        return [*range(num_images), *([text] if text else [])], False
    chunks: list[Chunk] = []
    for i, fragment in enumerate(text.split(place)):
        if i:
            chunks.append(i - 1)
        if fragment:
            chunks.append(fragment)
    return chunks, True


def join_context(chunks: Sequence[Chunk], in_place: bool, place: str = PLACE) -> str:
    """The text of `chunks`: each image as `place` when images are in place; else the images go first outside
    the text, which is its fragments."""
    return "".join(c if isinstance(c, str) else (place if in_place else "") for c in chunks)


@dataclass(frozen=True)
class PromptCut:
    prompt: str
    images: list[int]  # indices of the kept images, in order
    dropped_text_tokens: int
    dropped_images: int


def cut_prompt(
    prompt: str,
    num_images: int,
    max_len: int,
    tokenize: Callable[[str], Sequence],
    detokenize: Callable[[Sequence], str],
    image_tokens: int | Callable[[int], int] = LOOKM_IMAGE_TOKENS,
    instruction: str = "",
    place: str = PLACE,
) -> PromptCut:
    """`cut_context` on a whole prompt: `instruction + "\\n" + context` (MileBench's prompt: the instruction is
    kept whole, its tokens counted, the newline not), or only a context when `instruction` is ''. Images are the
    `num_images` of the prompt, at its `place`s or (none named) before its text."""
    if instruction:
        head = instruction + "\n"
        if not prompt.startswith(head) or place in instruction:
            raise ValueError(
                "the prompt does not start with its instruction and a newline, or the instruction names an image place"
            )
        context = prompt[len(head) :]
    else:
        head, context = "", prompt
    chunks, in_place = split_context(context, num_images, place)
    cut = cut_context(
        chunks, len(list(tokenize(instruction))) if instruction else 0, max_len, tokenize, detokenize, image_tokens
    )
    return PromptCut(
        prompt=head + join_context(cut.chunks, in_place, place),
        images=[c for c in cut.chunks if not isinstance(c, str)],
        dropped_text_tokens=cut.dropped_text_tokens,
        dropped_images=cut.dropped_images,
    )
