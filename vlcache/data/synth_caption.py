"""synth_caption (mirrors COCO-Caption): a scene of one to three coloured shapes; "Describe the image.".

Each shape sits in its own cell of a 3 x 3 layout (top left ... bottom right) on a plain or textured
background. The canonical caption names the shapes in reading order, e.g. "a red circle at top left and a
blue star at center"; four paraphrases (other order, "the", "there is", "in the ... corner") join it as the
references, like COCO's five captions per image. Scored by CIDEr over the split and by exact match against
the canonical caption.
"""

from __future__ import annotations

from PIL import ImageDraw

from vlcache.data.render import (
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    background,
    draw_shape,
    sample_rng,
    sample_seed,
    shape_cells,
)

TASK = "synth_caption"
QUESTION = "Describe the image."
PLACES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WHERE = (
    "in the top left corner", "at the top", "in the top right corner", "on the left side", "in the center",
    "on the right side", "in the bottom left corner", "at the bottom", "in the bottom right corner",
)  # fmt: skip
CELL = IMAGE_SIZE // 3


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(objects: list[tuple[str, str, int]]) -> list[str]:
    """The canonical caption first, then the paraphrases; objects are (colour, shape, place) in reading order."""
    plain = [f"a {c} {s} at {PLACES[p]}" for c, s, p in objects]
    the = [f"a {c} {s} at the {PLACES[p]}" for c, s, p in objects]
    corner = [f"a {c} {s} {WHERE[p]}" for c, s, p in objects]
    return [
        _join(plain),
        _join(the),
        _join(plain[::-1]),
        "there is " + _join(the),
        _join(corner) + (" of the picture" if len(objects) == 1 else ""),
    ]


def make(seed: int, labels: bool = False) -> dict:
    """One sample: {question, answer (the canonical caption), answers (all references), image, key}; `labels=True`
    adds "cells", the per-patch shape labels (render.shape_cells), and changes nothing else."""
    rng = sample_rng(TASK, seed)
    img = background(rng)
    draw = ImageDraw.Draw(img)
    n = rng.choice((1, 2, 2, 3, 3))
    places = sorted(rng.sample(range(9), n))
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    objects, drawn = [], []
    for (colour, shape), place in zip(kinds, places):
        size = rng.randint(56, 92)
        row, col = divmod(place, 3)
        x0 = col * CELL + rng.randint(4, CELL - size - 4)
        y0 = row * CELL + rng.randint(4, CELL - size - 4)
        draw_shape(draw, shape, colour, (x0, y0, x0 + size, y0 + size))
        drawn.append((shape, colour, (x0, y0, x0 + size, y0 + size)))
        objects.append((colour, shape, place))
    refs = captions(objects)
    out = {"question": QUESTION, "answer": refs[0], "answers": refs, "image": img, "key": refs[0]}
    if labels:
        out["cells"] = shape_cells(drawn)
    return out


def sample(split: str, index: int, **kwargs) -> dict:
    out = make(sample_seed(split, index), **kwargs)
    out["id"] = f"{TASK}_{split}_{index:05d}"
    return out
