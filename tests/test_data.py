"""The embedded benchmarks (vlcache/data) and the trained embedded model (vlcache/zoo/checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlcache.data import TASK_DIR, generators
from vlcache.data.render import IMAGE_SIZE, TASKS, TEST_SIZES, TRAIN_SEED_BASE, sample_seed

CHECKPOINT = Path(__file__).resolve().parent.parent / "vlcache" / "zoo" / "checkpoint"


def _images(sample: dict) -> list:
    return sample["images"] if "images" in sample else [sample["image"]]


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic(task):
    make = generators()[task]
    for split, index in (("test", 0), ("test", 7), ("train", 3)):
        a, b = make(split, index), make(split, index)
        assert (a["id"], a["question"], a["answer"], a["key"]) == (b["id"], b["question"], b["answer"], b["key"])
        assert [im.tobytes() for im in _images(a)] == [im.tobytes() for im in _images(b)]
        assert all(im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB" for im in _images(a))
    assert len(_images(make("test", 0))) == (4 if task == "synth_multi" else 1)
    # other seeds give other samples
    assert make("test", 0)["key"] != make("train", 0)["key"]
    assert len({make("test", i)["key"] for i in range(10)}) == 10


def test_train_and_test_seeds_are_disjoint():
    test_seeds = {sample_seed("test", i) for i in range(max(TEST_SIZES.values()))}
    assert max(test_seeds) < TRAIN_SEED_BASE <= sample_seed("train", 0)
    assert sample_seed("train", 10**9) > sample_seed("train", 0)
    with pytest.raises(ValueError):
        sample_seed("test", TRAIN_SEED_BASE)
    with pytest.raises(ValueError):
        sample_seed("val", 0)


@pytest.mark.parametrize("task", TASKS)
def test_shipped_parquet_is_the_generators_test_split(task):
    import datasets

    ds = datasets.load_dataset("parquet", data_files={"test": str(TASK_DIR / task / "test.parquet")})["test"]
    assert len(ds) == TEST_SIZES[task]
    assert {"id", "question", "answer"} <= set(ds.column_names)
    make = generators()[task]
    for i in (0, len(ds) - 1):
        row, sample = ds[i], make("test", i)
        assert (row["id"], row["question"], row["answer"]) == (sample["id"], sample["question"], sample["answer"])
        shipped = row["images"] if task == "synth_multi" else [row["image"]]
        assert [np.asarray(im.convert("RGB")).tobytes() for im in shipped] == [
            np.asarray(im).tobytes() for im in _images(sample)
        ]


@pytest.fixture(scope="module")
def task_dict():
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(TASK_DIR))
    return manager, get_task_dict(list(TASKS), manager)


WRONG = {"synth_docvqa": "zzzz", "synth_caption": "a blue blob", "synth_count": "9", "synth_multi": "7"}
METRIC = {"synth_docvqa": "anls", "synth_caption": "exact_match", "synth_count": "accuracy", "synth_multi": "accuracy"}


@pytest.mark.parametrize("task", TASKS)
def test_lmms_eval_loads_and_scores(task_dict, task):
    _, tasks = task_dict
    t = tasks[task]
    docs = t.test_docs()
    assert len(docs) == TEST_SIZES[task]
    doc = docs[0]
    visuals = t.config.doc_to_visual(doc)
    assert len(visuals) == (4 if task == "synth_multi" else 1)
    assert all(v.mode == "RGB" and v.size == (IMAGE_SIZE, IMAGE_SIZE) for v in visuals)
    assert t.config.doc_to_text(doc) == doc["question"]
    right = t.process_results(doc, [" " + doc["answer"] + " "])
    wrong = t.process_results(doc, [WRONG[task]])
    assert right[METRIC[task]] == 1.0
    assert wrong[METRIC[task]] < 1.0
    assert t.process_results(doc, [" " * 16])[METRIC[task]] == 0.0  # blanks score nothing (ANLS too)


def test_simple_evaluate_oracle_and_garbage(task_dict):
    """End to end through lmms-eval's evaluator: the reference scores 1 (CIDEr high), garbage scores 0."""
    from lmms_eval import evaluator
    from lmms_eval.api.model import lmms

    class Fixed(lmms):
        def __init__(self, oracle: bool):
            super().__init__()
            self.oracle = oracle

        def generate_until(self, requests):
            out = []
            for req in requests:
                ctx, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                assert ctx == doc["question"] and doc_to_visual(doc)
                out.append(doc["answer"] if self.oracle else "no idea")
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    manager, _ = task_dict
    for oracle in (True, False):
        res = evaluator.simple_evaluate(model=Fixed(oracle), tasks=list(TASKS), task_manager=manager, limit=4)
        scores = {t: res["results"][t][f"{METRIC[t]},none"] for t in TASKS}
        if oracle:
            assert all(v == 1.0 for v in scores.values()), scores
            assert res["results"]["synth_caption"]["cider,none"] > 1.0
        else:
            assert all(v == 0.0 for v in scores.values()), scores
            assert res["results"]["synth_caption"]["cider,none"] < 0.1


def test_checkpoint_loads_with_from_pretrained():
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert sum(f.stat().st_size for f in CHECKPOINT.iterdir()) < 30e6
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] >= 6
    assert config["text_config"]["num_key_value_heads"] < config["text_config"]["num_attention_heads"]
    model = LlavaForConditionalGeneration.from_pretrained(str(CHECKPOINT))
    processor = AutoProcessor.from_pretrained(str(CHECKPOINT))
    assert model.dtype == getattr(torch, config["dtype"])
    make = generators()
    for task in ("synth_count", "synth_multi"):
        sample = make[task]("test", 0)
        images = _images(sample)
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": sample["question"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        assert text.endswith(sample["question"] + " ASSISTANT:")
        batch = processor(text=[text], images=images, return_tensors="pt")
        assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 576 * len(images)
        assert tuple(batch["pixel_values"].shape) == (len(images), 3, IMAGE_SIZE, IMAGE_SIZE)


def test_training_inputs_match_the_processor():
    """train.py builds prompts and pixels itself (the GPU machines lack the image processor's version):
    they must equal what the framework's processor gives."""
    from vlcache.zoo.processor import build_processor
    from vlcache.zoo.train import Encoder, normalise, pixels_uint8

    processor, enc = build_processor(), Encoder()
    for task in ("synth_docvqa", "synth_multi"):
        sample = generators()[task]("test", 1)
        images = _images(sample)
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": sample["question"]}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        batch = processor(text=[text], images=images, return_tensors="pt")
        assert batch["input_ids"][0].tolist() == enc.prompt_ids(sample["question"], len(images))
        assert float((normalise(pixels_uint8([sample])) - batch["pixel_values"]).abs().max()) < 1e-5
        if len(images) > 1:
            assert "Image 4: <image>" in text
