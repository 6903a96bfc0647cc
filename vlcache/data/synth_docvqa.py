"""synth_docvqa (mirrors DocVQA): a rendered receipt or form of "field: value" lines; "What is the {field}?".

The form is set in DejaVu Sans Mono on the 14 px patch grid, one character per patch, like a receipt
printer's fixed pitch: field names start at a left margin and the values start in one aligned column. The
answer is a value read off one line (a dozen of the 576 image tokens): the sparse case VL-Cache exploits.
Values are random codes, numbers, dates and names, so the language model cannot guess them. Scored by ANLS.
"""

from __future__ import annotations

import random
import string

import numpy as np
from PIL import ImageDraw

from vlcache.data.render import GRID, IMAGE_SIZE, PATCH, background, char_class, font, sample_rng, sample_seed

TASK = "synth_docvqa"
FONT_SIZE = 17
MAX_VALUE = 11  # characters; the value column starts at the margin + 10
LABEL_WIDTH = 10  # "account:" and a space fit in 10 cells

HEADERS = ("RECEIPT", "INVOICE", "ORDER FORM", "DELIVERY NOTE", "REGISTRATION", "SALES SLIP", "WORK ORDER")
SURNAMES = (
    "Smith", "Brown", "Garcia", "Miller", "Davis", "Lopez", "Wilson", "Moore", "Taylor", "Clark",
    "Lewis", "Walker", "Young", "King", "Wright", "Scott", "Green", "Baker", "Adams", "Nelson",
    "Hill", "Campbell", "Mitchell", "Roberts", "Carter", "Phillips", "Evans", "Turner", "Torres", "Parker",
)  # fmt: skip
CITIES = (
    "Boston", "Denver", "Austin", "Chicago", "Seattle", "Portland", "Dallas", "Phoenix", "Atlanta", "Miami",
    "Detroit", "Houston", "Memphis", "Omaha", "Tulsa", "Reno", "Tampa", "Fresno", "Madison", "Raleigh",
    "Oslo", "Lisbon", "Vienna", "Prague", "Dublin", "Madrid", "Berlin", "Zurich", "Geneva", "Munich",
)  # fmt: skip
ITEMS = (
    "coffee", "paper", "stapler", "ink", "folder", "pencils", "bread", "apples", "cheese", "milk",
    "batteries", "cable", "lamp", "tape", "envelopes", "markers", "soap", "rice", "tea", "juice",
)  # fmt: skip
ALNUM = string.ascii_uppercase + string.digits


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _money(rng: random.Random) -> str:
    return f"{rng.randint(0, 10 ** rng.randint(1, 3) - 1)}.{_digits(rng, 2)}"


FIELDS = {
    "date": lambda r: f"{r.randint(1990, 2029)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    "time": lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}",
    "total": _money,
    "tax": _money,
    "name": lambda r: f"{r.choice(string.ascii_uppercase)}. {r.choice(SURNAMES)}",
    "city": lambda r: r.choice(CITIES),
    "phone": lambda r: f"{_digits(r, 3)}-{_digits(r, 4)}",
    "invoice": lambda r: "".join(r.choice(ALNUM) for _ in range(r.randint(5, 8))),
    "account": lambda r: f"{_digits(r, 4)}-{_digits(r, 4)}",
    "item": lambda r: r.choice(ITEMS),
    "quantity": lambda r: str(r.randint(1, 250)),
    "code": lambda r: "-".join(f"{r.choice(string.ascii_lowercase)}{_digits(r, 2)}" for _ in range(2)),
    "zip": lambda r: _digits(r, 5),
    "order": lambda r: f"#{_digits(r, r.randint(3, 6))}",
}
QUESTION = "What is the {field}?"


def _write(
    draw: ImageDraw.ImageDraw, row: int, col: int, text: str, ink: tuple[int, int, int], cells: np.ndarray | None = None
) -> None:
    """One character per 14 px cell, centred horizontally, capitals filling the cell's height; `cells` (the
    per-patch labels, when asked for) gets each character's class at its cell."""
    f = font(FONT_SIZE)
    for k, ch in enumerate(text):
        if ch == " ":
            continue
        if cells is not None:
            cells[row, col + k] = char_class(ch)
        x = (col + k) * PATCH + PATCH / 2
        y = row * PATCH + PATCH - 1  # baseline near the bottom of the cell; descenders spill below
        draw.text((x, y), ch, font=f, fill=ink, anchor="ms")


def make(seed: int, fields: tuple[int, int] = (5, 9), labels: bool = False) -> dict:
    """One sample: {question, answer, answers, field, image, key, transcript}; `fields`: the range of lines on the form
    (the test split uses the default; training may mix in shorter forms as a curriculum). `labels=True` adds
    "cells": the `[GRID, GRID]` uint8 class of the character printed in each cell (render.char_class; 0: blank),
    and changes nothing else."""
    rng = sample_rng(TASK, seed)
    img = background(rng, textured=False)
    draw = ImageDraw.Draw(img)
    ink = rng.choice(((20, 20, 20), (25, 35, 90), (70, 40, 25), (40, 40, 40)))
    margin = rng.randint(1, 2)
    cells = np.zeros((GRID, GRID), np.uint8) if labels else None

    n = rng.randint(*fields)
    names = rng.sample(sorted(FIELDS), n)
    values = {name: FIELDS[name](rng) for name in names}
    header = rng.choice(HEADERS)
    _write(draw, 1, (GRID - len(header)) // 2, header, ink, cells)
    if rng.random() < 0.5:
        _write(draw, 2, margin, "-" * (GRID - 2 * margin), ink, cells)
    # n lines on n of the nine slots two rows apart (rows 3..21): the gaps vary from form to form
    start = rng.randint(3, 4)
    rows = sorted(rng.sample(range(start, start + 18, 2), n))
    lines = [header]
    for name, r in zip(names, rows):
        _write(draw, r, margin, f"{name}:", ink, cells)
        _write(draw, r, margin + LABEL_WIDTH, values[name], ink, cells)
        lines.append(f"{name}: {values[name]}")
    if rng.random() < 0.5:
        footer = rng.choice(("THANK YOU", "SIGNATURE", "PAID", "COPY"))
        _write(draw, 23, (GRID - 9) // 2, footer, ink, cells)
        lines.append(footer)
    draw.rectangle([2, 2, IMAGE_SIZE - 3, IMAGE_SIZE - 3], outline=ink, width=1)

    field = rng.choice(names)
    answer = values[field]
    assert len(answer) <= MAX_VALUE and margin + LABEL_WIDTH + len(answer) <= GRID, answer
    key = "|".join(f"{k}={values[k]}" for k in names) + f"?{field}"
    out = {
        "question": QUESTION.format(field=field),
        "answer": answer,
        "answers": [answer],
        "field": field,
        "image": img,
        "key": key,
        "transcript": "\n".join(lines),  # the form's text in reading order (training's reading task)
    }
    if labels:
        out["cells"] = cells
    return out


def sample(split: str, index: int, **kwargs) -> dict:
    out = make(sample_seed(split, index), **kwargs)
    out["id"] = f"{TASK}_{split}_{index:05d}"
    return out
