"""synth_count (mirrors MathVista-style counting): "How many {colour} shapes are there?".

Up to fifteen small shapes of six colours are scattered over the whole image, each in its own 2 x 2-patch
slot of the 14 px grid, no two slots touching; the asked-for colour appears one to seven times among
distractors of the other colours. The answer needs every shape of that colour, wherever it is: the dense
case, where dropping image tokens should hurt. Scored by accuracy on the number.
"""

from __future__ import annotations

from PIL import ImageDraw

from vlcache.data.render import COLOURS, PATCH, SHAPES, background, draw_shape, sample_rng, sample_seed, shape_cells

TASK = "synth_count"
QUESTION = "How many {colour} shapes are there?"
SLOTS = 12  # a 12 x 12 grid of 28 px slots
MAX_COUNT = 7


def make(seed: int, labels: bool = False) -> dict:
    """One sample: {question, answer (a digit), colour, image, key}; `labels=True` adds "cells", the per-patch shape
    labels (render.shape_cells), and changes nothing else."""
    rng = sample_rng(TASK, seed)
    img = background(rng)
    draw = ImageDraw.Draw(img)
    colour = rng.choice(sorted(COLOURS))
    count = rng.randint(1, MAX_COUNT)
    others = [c for c in sorted(COLOURS) if c != colour]
    colours = [colour] * count + [rng.choice(others) for _ in range(rng.randint(3, 8))]
    rng.shuffle(colours)

    free = [(r, c) for r in range(SLOTS) for c in range(SLOTS)]
    taken: list[tuple[int, int]] = []
    drawn = []
    for col in colours:
        r, c = rng.choice(free)
        taken.append((r, c))
        free = [(a, b) for a, b in free if abs(a - r) > 1 or abs(b - c) > 1]
        x0, y0 = 2 * c * PATCH + 2, 2 * r * PATCH + 2
        kind, box = rng.choice(SHAPES), (x0, y0, x0 + 2 * PATCH - 5, y0 + 2 * PATCH - 5)
        draw_shape(draw, kind, col, box)
        drawn.append((kind, col, box))
    key = colour + ":" + ",".join(f"{col}@{r}.{c}" for col, (r, c) in sorted(zip(colours, taken)))
    out = {
        "question": QUESTION.format(colour=colour),
        "answer": str(count),
        "colour": colour,
        "image": img,
        "key": key,
    }
    if labels:
        out["cells"] = shape_cells(drawn)
    return out


def sample(split: str, index: int, **kwargs) -> dict:
    out = make(sample_seed(split, index), **kwargs)
    out["id"] = f"{TASK}_{split}_{index:05d}"
    return out
