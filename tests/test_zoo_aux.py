"""The dense auxiliary loss of vlcache/zoo/train.py: per-patch labels from the generators, the training-only head."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vlcache.data import TASK_DIR, generators
from vlcache.data.render import (
    CELL_BLANK,
    COLOURS,
    GRID,
    MIN_COVER,
    NUM_CELL_CLASSES,
    PATCH,
    SHAPE_CLASS0,
    SHAPES,
    TASKS,
    cell_class_name,
    char_class,
    shape_class,
)
from vlcache.data.synth_caption import PLACES

TINY_SPEC = {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 128, "vision_hidden": 32,
             "vision_layers": 1, "vision_heads": 2}  # fmt: skip


def _images(sample: dict) -> list:
    return sample["images"] if "images" in sample else [sample["image"]]


def _grids(sample: dict) -> list[np.ndarray]:
    cells = sample["cells"]
    return list(cells) if cells.ndim == 3 else [cells]


def _cell(arr: np.ndarray, r: int, c: int) -> np.ndarray:
    return arr[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]


CASES = [("test", 0, {}), ("test", 1, {}), ("test", 299, {}), ("train", 5, {}), ("train", 123_457, {})]


@pytest.mark.parametrize("task", TASKS)
def test_labels_change_nothing_else(task):
    make = generators()[task]
    cases = CASES + ([("train", 7, {"fields": (1, 4)})] if task == "synth_docvqa" else [])
    for split, index, kw in cases:
        plain, labelled = make(split, index, **kw), make(split, index, labels=True, **kw)
        assert set(labelled) == set(plain) | {"cells"}
        for key, value in plain.items():
            if key in ("image", "images"):
                assert [im.tobytes() for im in _images(labelled)] == [im.tobytes() for im in _images(plain)]
            else:
                assert labelled[key] == value, key
        grids = _grids(labelled)
        assert len(grids) == len(_images(plain))
        assert all(g.shape == (GRID, GRID) and g.dtype == np.uint8 and g.max() < NUM_CELL_CLASSES for g in grids)


@pytest.mark.parametrize("task", TASKS)
def test_labelled_samples_are_the_shipped_test_split(task):
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(TASK_DIR / task / "test.parquet").to_pylist()
    make = generators()[task]
    for i in (0, 5, len(table) - 1):
        row, sample = table[i], make("test", i, labels=True)
        assert (row["id"], row["question"], row["answer"]) == (sample["id"], sample["question"], sample["answer"])
        shipped = row["images"] if task == "synth_multi" else [row["image"]]
        pixels = [np.asarray(Image.open(io.BytesIO(im["bytes"])).convert("RGB")) for im in shipped]
        assert [p.tobytes() for p in pixels] == [np.asarray(im).tobytes() for im in _images(sample)]


def test_char_classes():
    assert char_class(" ") == CELL_BLANK
    assert {cell_class_name(char_class(ch)) for ch in "aZ0-:.#"} == set("aZ0-:.#")
    assert len({char_class(chr(o)) for o in range(33, 127)}) == 94 and SHAPE_CLASS0 == 95
    assert cell_class_name(shape_class("orange", "star")) == "orange star"
    assert len({shape_class(c, s) for c in COLOURS for s in SHAPES}) == NUM_CELL_CLASSES - SHAPE_CLASS0
    with pytest.raises(ValueError):
        char_class("\n")


@pytest.mark.parametrize("index", [0, 1, 2, 3, 17, 299])
def test_docvqa_cells_spell_the_form_where_it_is_printed(index):
    sample = generators()["synth_docvqa"]("test", index, labels=True)
    cells = sample["cells"]
    rows = {r: "".join(cell_class_name(v) for v in cells[r] if v != CELL_BLANK) for r in range(GRID)}
    rows = {r: text for r, text in rows.items() if text}
    lines = sample["transcript"].split("\n")
    # every line of the form's text is one labelled row (spaces are blank cells); the only other row is the rule
    assert sorted(line.replace(" ", "") for line in lines) == sorted(t for t in rows.values() if set(t) != {"-"})
    # the asked value sits in the value column of its field's row
    row = next(r for r, t in rows.items() if t.startswith(sample["field"] + ":"))
    value = [cell_class_name(v) for v in cells[row, GRID // 2 - 2 :] if v != CELL_BLANK]
    assert "".join(value).endswith(sample["answer"].replace(" ", ""))
    # ink: each labelled cell has dark pixels; a blank cell under a blank cell (no descender) has none
    arr = np.asarray(sample["image"]).min(axis=2).copy()
    arr[:4], arr[-4:], arr[:, :4], arr[:, -4:] = 255, 255, 255, 255  # the frame drawn 2 px inside the edge
    dark = arr < 160
    for r in range(GRID):
        for c in range(GRID):
            if cells[r, c] != CELL_BLANK:
                assert _cell(dark, r, c).sum() >= 4, (r, c, cell_class_name(cells[r, c]))
            elif r == 0 or cells[r - 1, c] == CELL_BLANK:
                assert _cell(dark, r, c).sum() == 0, (r, c)


def _colour_pixels(img: np.ndarray, colour: str) -> np.ndarray:
    fill = np.array(COLOURS[colour])
    outline = np.array([int(v * 0.6) for v in COLOURS[colour]])
    return (img == fill).all(-1) | (img == outline).all(-1)


@pytest.mark.parametrize("task", ["synth_caption", "synth_count", "synth_multi"])
@pytest.mark.parametrize("index", [0, 1, 2, 3, 4, 5, 6, 7])
def test_shape_cells_sit_on_their_shapes(task, index):
    sample = generators()[task]("test", index, labels=True)
    for image, cells in zip(_images(sample), _grids(sample)):
        img = np.asarray(image)
        masks = {c: _colour_pixels(img, c) for c in COLOURS}
        assert (cells != CELL_BLANK).any()
        for r in range(GRID):
            for c in range(GRID):
                cls = int(cells[r, c])
                if cls == CELL_BLANK:
                    assert all(_cell(m, r, c).sum() < MIN_COVER for m in masks.values()), (r, c)
                else:
                    assert cls >= SHAPE_CLASS0
                    colour = cell_class_name(cls).split()[0]
                    assert _cell(masks[colour], r, c).sum() >= MIN_COVER, (r, c, cell_class_name(cls))


@pytest.mark.parametrize("index", range(10))
def test_shape_cells_agree_with_the_answers(index):
    gen = generators()
    # caption: the labelled (colour, shape) pairs are the caption's, each in its place of the 3 x 3 layout
    cap = gen["synth_caption"]("test", index, labels=True)
    found = {}
    for r, c in np.argwhere(cap["cells"] != CELL_BLANK):
        found.setdefault(cell_class_name(cap["cells"][r, c]), set()).add((r * PATCH // 112) * 3 + c * PATCH // 112)
    said = {}
    for part in re.split(", | and ", cap["answer"]):  # "a {colour} {shape} at {place}"
        words = part.split(" at ")
        said[words[0].removeprefix("a ")] = {PLACES.index(words[1])}
    assert found == said
    # count: the asked colour labels exactly `answer` of the 2 x 2-patch slots
    cnt = gen["synth_count"]("test", index, labels=True)
    slots = {(r // 2, c // 2) for r, c in np.argwhere(cnt["cells"] != CELL_BLANK)
             if cell_class_name(cnt["cells"][r, c]).split()[0] == cnt["colour"]}  # fmt: skip
    assert len(slots) == int(cnt["answer"])
    # multi: the asked thing is labelled in the answer's image only
    mul = gen["synth_multi"]("test", index, labels=True)
    has = [mul["thing"] in {cell_class_name(v) for v in np.unique(g)} for g in mul["cells"]]
    assert has == [i + 1 == int(mul["answer"]) for i in range(4)]


def test_train_stream_batches_carry_cells():
    from vlcache.zoo.train import Encoder, TrainStream, training_batch

    gen, enc = generators(), Encoder()
    samples = [gen["synth_multi"]("train", i, labels=True) for i in range(2)]
    batch = training_batch(enc, samples)
    assert batch["cells"].shape == (8, GRID * GRID) and batch["pixels"].shape[0] == 8
    assert torch.equal(batch["cells"][5], torch.from_numpy(samples[1]["cells"][1].reshape(-1)))
    assert "cells" not in training_batch(enc, [gen["synth_count"]("train", 0)])
    stream = TrainStream({t: 2 for t in TASKS}, start=0, exclude={t: set() for t in TASKS}, labels=("synth_docvqa",))
    for _, (task, batch) in zip(range(8), stream):
        assert ("cells" in batch) == (task == "synth_docvqa")


def test_aux_loss_and_tap():
    from vlcache.zoo.model import TinyLlavaSpec
    from vlcache.zoo.train import AuxHead, Encoder, FeatureTap, aux_loss, build_model, common_logodds

    cells = torch.zeros(2, GRID * GRID, dtype=torch.long)
    cells[:, :10] = 5
    perfect = torch.nn.functional.one_hot(cells, NUM_CELL_CLASSES).float() * 50
    loss, acc = aux_loss(perfect, cells)
    assert loss.item() < 1e-6 and acc.item() == 1.0
    blank = torch.nn.functional.one_hot(torch.zeros_like(cells), NUM_CELL_CLASSES).float() * 50
    loss, acc = aux_loss(blank, cells)
    assert loss.item() == pytest.approx(25.0, rel=1e-3) and acc.item() == 0.0  # the drawn half: 50 / 2

    # the head starts at the uniform guess, ignores what all patches share (a trained projector's large common
    # vector) and the features' scale, and its gradient reaches the features
    head = AuxHead(8)
    feats = torch.randn(2, GRID * GRID, 8)
    assert torch.equal(head(feats), torch.zeros(2, GRID * GRID, NUM_CELL_CLASSES))
    torch.nn.init.normal_(head.proj.weight)
    assert torch.allclose(head(3 * feats + 300 * torch.randn(8)), head(feats), atol=1e-3)
    feats.requires_grad_(True)
    aux_loss(head(feats), cells)[0].backward()
    assert feats.grad.abs().sum() > 0
    # common_logodds: log(common energy / patch-specific energy)
    common = torch.randn(8)
    centred = torch.randn(2, GRID * GRID, 8)
    centred = centred - centred.reshape(-1, 8).mean(0)
    ratio = common.pow(2).sum() / centred.pow(2).sum(-1).mean()
    assert common_logodds(common + 0.01 * centred).item() == pytest.approx(ratio.log().item() + math.log(1e4), abs=1e-3)
    assert common_logodds(centred).item() < -10

    model = build_model(TinyLlavaSpec(**TINY_SPEC), Encoder())
    for where, dim in (("projector", TINY_SPEC["hidden"]), ("vision", TINY_SPEC["vision_hidden"])):
        tap = FeatureTap(model, where)
        model.model.get_image_features(pixel_values=torch.zeros(3, 3, 336, 336))
        feats = tap.pop()
        assert tap.dim == dim and feats.shape == (3, GRID * GRID, dim) and feats.requires_grad
        assert AuxHead(dim)(feats).shape == (3, GRID * GRID, NUM_CELL_CLASSES)
        tap.remove()
        model.model.get_image_features(pixel_values=torch.zeros(1, 3, 336, 336))
        assert tap.pop() is None


def _train(out: Path, *extra: str) -> str:
    from vlcache.zoo.train import main

    main(["--device", "cpu", "--steps", "3", "--batch", "2", "--workers", "0", "--eval-n", "1", "--warmup", "2",
          "--spec", json.dumps(TINY_SPEC), "--out", str(out), *extra])  # fmt: skip
    return (out / "log.txt").read_text()


def test_aux_head_trains_apart_and_is_never_exported(tmp_path):
    from safetensors.torch import load_file

    from vlcache.zoo.model import TinyLlavaSpec
    from vlcache.zoo.train import AUX_HEAD_FILE, Encoder, build_model

    expected = set(build_model(TinyLlavaSpec(**TINY_SPEC), Encoder()).state_dict())
    log = _train(tmp_path / "a")  # today's behaviour: no head
    assert not (tmp_path / "a" / AUX_HEAD_FILE).exists() and "aux loss" not in log and "(aux " not in log
    # resumed from weights without a head: a fresh one, trained on both kinds of labels
    log = _train(tmp_path / "b", "--resume", str(tmp_path / "a" / "model_fp32.safetensors"), "--aux-ocr", "1",
                 "--aux-shapes", "0.5", "--aux-center", "0.1", "--log-every", "1")  # fmt: skip
    assert "aux loss on the projector features" in log and "aux head from" not in log
    assert "common-part loss on the projector features, weight 0.1" in log
    assert "(aux " in log and " common " in log and (tmp_path / "b" / "eval.json").exists()
    assert set(load_file(str(tmp_path / "b" / "model_fp32.safetensors"))) == expected
    head = load_file(str(tmp_path / "b" / AUX_HEAD_FILE))
    assert {k: tuple(v.shape) for k, v in head.items()} == {
        "proj.weight": (NUM_CELL_CLASSES, TINY_SPEC["hidden"]),
        "proj.bias": (NUM_CELL_CLASSES,),
    }
    # resumed from a run with a head: it carries on
    log = _train(tmp_path / "c", "--resume", str(tmp_path / "b"), "--aux-ocr", "1")
    assert f"aux head from {tmp_path / 'b' / AUX_HEAD_FILE}" in log

    # the exported checkpoint is the model alone
    from transformers import LlavaForConditionalGeneration

    from vlcache.zoo.train import export

    export(tmp_path / "c", tmp_path / "ckpt")
    assert not any("aux" in p.name for p in (tmp_path / "ckpt").iterdir())
    exported = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert len(exported) == len(expected) and not any("aux" in k or k.startswith("proj.") for k in exported)
    loaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ckpt"))
    assert set(loaded.state_dict()) == expected
