"""Shared drawing and seeding for the embedded synthetic benchmarks.

Every image is 336 x 336 px, LLaVA-1.5's input size: with 14 px patches that is a 24 x 24 grid of 576 image
tokens. A sample is a pure function of (task, split, index): `sample_rng` seeds Python's `random.Random`
(whose integer and choice streams are stable across Python versions) from a seed that `sample_seed` keeps
disjoint between the test split shipped in the package and the training stream of vlcache/zoo/train.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 patches a side

FONT_PATH = Path(__file__).resolve().parent / "fonts" / "DejaVuSansMono.ttf"

TASKS = ("synth_docvqa", "synth_caption", "synth_count", "synth_multi")
SPLITS = ("test", "train")
# Seeds: the test split uses [0, TRAIN_SEED_BASE); training draws from TRAIN_SEED_BASE upwards.
TRAIN_SEED_BASE = 10_000_000
TEST_SIZES = {"synth_docvqa": 300, "synth_caption": 300, "synth_count": 300, "synth_multi": 200}

COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 160, 60),
    "blue": (36, 84, 220),
    "yellow": (238, 196, 20),
    "purple": (135, 55, 185),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")


def sample_seed(split: str, index: int) -> int:
    """The seed of sample `index` of `split`: test seeds are below TRAIN_SEED_BASE, training seeds above."""
    if index < 0:
        raise ValueError("sample index must be >= 0")
    if split == "test":
        if index >= TRAIN_SEED_BASE:
            raise ValueError(f"test index {index} would reach the training seeds")
        return index
    if split == "train":
        return TRAIN_SEED_BASE + index
    raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


def sample_rng(task: str, seed: int) -> random.Random:
    """A generator private to (task, seed): string seeding hashes with SHA-512, stable across runs."""
    return random.Random(f"{task}:{seed}")


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), size)


def _pastel(rng: random.Random, lo: int = 215, hi: int = 250) -> tuple[int, int, int]:
    return tuple(rng.randint(lo, hi) for _ in range(3))


def background(rng: random.Random, textured: bool | None = None) -> Image.Image:
    """A plain light background, or a low-contrast texture (stripes, checks, dots or a grid).

    Textures are regular patterns in light tints, so they stay distinct from the saturated shape colours and
    compress well as PNG.
    """
    base = _pastel(rng)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), base)
    if textured is None:
        textured = rng.random() < 0.5
    if not textured:
        return img
    draw = ImageDraw.Draw(img)
    ink = tuple(max(0, c - rng.randint(18, 40)) for c in base)
    kind = rng.choice(("hstripes", "dstripes", "checks", "dots", "grid"))
    step = rng.randint(9, 24)
    if kind == "hstripes":
        width = rng.randint(2, max(2, step // 2))
        for y in range(rng.randint(0, step), IMAGE_SIZE, step):
            draw.rectangle([0, y, IMAGE_SIZE, y + width - 1], fill=ink)
    elif kind == "dstripes":
        width = rng.randint(2, 4)
        for x in range(-IMAGE_SIZE, IMAGE_SIZE, step):
            draw.line([(x, IMAGE_SIZE), (x + IMAGE_SIZE, 0)], fill=ink, width=width)
    elif kind == "checks":
        for y in range(0, IMAGE_SIZE, step):
            for x in range((y // step) % 2 * step, IMAGE_SIZE, 2 * step):
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
    elif kind == "dots":
        r = rng.randint(1, 3)
        for y in range(step // 2, IMAGE_SIZE, step):
            for x in range(step // 2, IMAGE_SIZE, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    else:
        for v in range(rng.randint(0, step), IMAGE_SIZE, step):
            draw.line([(v, 0), (v, IMAGE_SIZE)], fill=ink, width=1)
            draw.line([(0, v), (IMAGE_SIZE, v)], fill=ink, width=1)
    return img


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: str, box: tuple[float, float, float, float]) -> None:
    """Draws a filled `kind` of `colour` inside the box (x0, y0, x1, y1), outlined in a darker tone."""
    fill = COLOURS[colour]
    _draw_kind(draw, kind, box, fill, tuple(int(c * 0.6) for c in fill))


def _draw_kind(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], fill, outline) -> None:
    """The geometry of `draw_shape` (shared with `shape_cells`, which draws the same pixels as class ids)."""
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if kind == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=2)
    elif kind == "square":
        draw.rectangle(box, fill=fill, outline=outline, width=2)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=2)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill, outline=outline, width=2)
    elif kind == "star":
        pts = []
        for k in range(10):
            r = (w / 2 if k % 2 == 0 else w / 4.6), (h / 2 if k % 2 == 0 else h / 4.6)
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r[0] * math.cos(a), cy + r[1] * math.sin(a)))
        draw.polygon(pts, fill=fill, outline=outline, width=2)
    else:
        raise ValueError(f"unknown shape {kind!r}")


# Per-patch labels (training only: vlcache/zoo/aux.py's dense auxiliary loss). Each of the GRID x GRID patches gets
# one class: CELL_BLANK, a printed character (synth_docvqa: one character per cell), or the (colour, shape) that
# covers most of the patch's pixels, if at least a quarter of them (the shape tasks; every shape of synth_count's
# 23 px ones gets a cell, which the patch-centre pixel alone would miss for a sixth of them). The generators
# return them only when asked (`labels=True`); asking changes nothing else in a sample.
CELL_BLANK = 0
CHAR_FIRST, CHAR_LAST = 33, 126  # printable ASCII but the space: classes 1..94
SHAPE_CLASS0 = CHAR_LAST - CHAR_FIRST + 2  # 95: (colour, shape) classes follow the characters
NUM_CELL_CLASSES = SHAPE_CLASS0 + len(COLOURS) * len(SHAPES)  # 125
MIN_COVER = PATCH * PATCH // 4  # pixels of a patch a shape must cover to label it


def char_class(ch: str) -> int:
    """The cell class of a printed character (the space is blank)."""
    if ch == " ":
        return CELL_BLANK
    if not CHAR_FIRST <= ord(ch) <= CHAR_LAST:
        raise ValueError(f"no cell class for {ch!r}")
    return ord(ch) - CHAR_FIRST + 1


def shape_class(colour: str, kind: str) -> int:
    return SHAPE_CLASS0 + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(kind)


def cell_class_name(cls: int) -> str:
    """'blank', the character, or 'colour shape' (for tests and logs)."""
    if cls == CELL_BLANK:
        return "blank"
    if cls < SHAPE_CLASS0:
        return chr(cls - 1 + CHAR_FIRST)
    colour, kind = divmod(cls - SHAPE_CLASS0, len(SHAPES))
    return f"{list(COLOURS)[colour]} {SHAPES[kind]}"


def shape_cells(shapes: Sequence[tuple[str, str, tuple[float, float, float, float]]]) -> np.ndarray:
    """`[GRID, GRID]` uint8 shape labels of an image whose shapes (kind, colour, box) were drawn in this order: the
    same polygons as `draw_shape` (fill and outline), drawn as class ids on a blank mask; a patch takes the class
    with the most pixels in it when that is at least MIN_COVER."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), CELL_BLANK)
    draw = ImageDraw.Draw(mask)
    for kind, colour, box in shapes:
        cls = shape_class(colour, kind)
        _draw_kind(draw, kind, box, cls, cls)
    patches = np.asarray(mask).reshape(GRID, PATCH, GRID, PATCH)
    top = patches.max((1, 3))  # usually the patch's only class
    cover = (patches == top[:, None, :, None]).sum((1, 3))
    cells = np.where(cover >= MIN_COVER, top, CELL_BLANK).astype(np.uint8)
    for r, c in np.argwhere((patches != CELL_BLANK).sum((1, 3)) > cover):  # two shapes in one patch: count them
        values, counts = np.unique(patches[r, :, c], return_counts=True)
        counts[values == CELL_BLANK] = 0
        cells[r, c] = values[counts.argmax()] if counts.max() >= MIN_COVER else CELL_BLANK
    return cells
