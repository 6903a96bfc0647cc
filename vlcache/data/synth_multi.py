"""synth_multi (mirrors multi-image and video prompts): four images in one prompt; "Which image shows the {thing}?".

Each image holds one or two coloured shapes on its own background; exactly one of the four holds the asked-
for thing (a colour and a shape), and the others hold near misses (the same colour or the same shape) and
unrelated shapes. Four images make 2,304 image tokens before the question. The answer is the image's
number, 1 to 4. Scored by accuracy.
"""

from __future__ import annotations

import numpy as np
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

TASK = "synth_multi"
NUM_IMAGES = 4
QUESTION = "Which image shows the {colour} {shape}?"


def make(seed: int, labels: bool = False) -> dict:
    """One sample: {question, answer ("1".."4"), thing, images (four PIL images), key}; `labels=True` adds "cells",
    `[4, GRID, GRID]` per-patch shape labels of the four images (render.shape_cells), and changes nothing else."""
    rng = sample_rng(TASK, seed)
    things = [(c, s) for c in sorted(COLOURS) for s in SHAPES]
    target = rng.choice(things)
    near = [t for t in things if t != target and (t[0] == target[0] or t[1] == target[1])]
    rest = [t for t in things if t != target]
    where = rng.randrange(NUM_IMAGES)
    images, contents, cells = [], [], []
    for i in range(NUM_IMAGES):
        n = rng.randint(1, 2)
        pool = [rng.choice(near if rng.random() < 0.5 else rest) for _ in range(n)]
        if i == where:
            pool[rng.randrange(n)] = target
        img = background(rng)
        draw = ImageDraw.Draw(img)
        boxes: list[tuple[int, int, int, int]] = []
        drawn = []
        for colour, shape in pool:
            size = rng.randint(60, 110)
            for _ in range(100):  # place without overlapping the other shape
                x0, y0 = rng.randint(6, IMAGE_SIZE - size - 6), rng.randint(6, IMAGE_SIZE - size - 6)
                box = (x0, y0, x0 + size, y0 + size)
                if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                    break
            boxes.append(box)
            draw_shape(draw, shape, colour, box)
            drawn.append((shape, colour, box))
        images.append(img)
        if labels:
            cells.append(shape_cells(drawn))
        contents.append("+".join(f"{c} {s}" for c, s in pool))
    out = {
        "question": QUESTION.format(colour=target[0], shape=target[1]),
        "answer": str(where + 1),
        "thing": f"{target[0]} {target[1]}",
        "images": images,
        "key": f"{target[0]} {target[1]}?" + "|".join(contents),
    }
    if labels:
        out["cells"] = np.stack(cells)
    return out


def sample(split: str, index: int, **kwargs) -> dict:
    out = make(sample_seed(split, index), **kwargs)
    out["id"] = f"{TASK}_{split}_{index:05d}"
    return out
