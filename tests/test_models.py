"""Every architecture, tiny and random, on the CPU: image-token spans, positions, budget 1 ≡ full for every
preset, compressed decoding ≡ the masked reference; and the real models' and datasets' configs (offline
messages, lmms-eval task names, the paper experiments).

The tiny instances (vlcache/models/tiny.py) are built from each architecture's config class with the real
processor classes over a character-level tokenizer: LLaVA-1.5 (576 tokens per image), LLaVA-NeXT (anyres tiles
with row separators), LLaVA-OneVision (SigLIP, anyres_max_9), Qwen2-VL and Qwen2.5-VL (dynamic resolution,
vision start/end tokens, M-RoPE). Two left-padded prompts with images of different sizes, so the two
sequences have different numbers of image tokens.
"""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import preset
from PIL import Image
from reference import masked_reference_generate

from vlcache import kernels
from vlcache.engine.generate import generate
from vlcache.models.hub import MissingResource
from vlcache.models.load import ADAPTERS, check_model
from vlcache.models.tiny import FAMILIES, build_tiny
from vlcache.policies.policy import build_policy

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
STEPS = 6
PRESETS = ["full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "elastic", "lookm", "vlcache"]
QUESTIONS = ["What is it?", "Which colour is the largest shape, and where is it?"]
SIZES = [(100, 160), (150, 90)]  # (height, width): different token counts per image for the anyres families


@pytest.fixture(autouse=True)
def torch_scoring_core(monkeypatch):
    """The PyTorch form of the scoring core (the Triton interpreter is slow; tests/test_scores.py checks both)."""
    monkeypatch.setattr(kernels, "attention_scores", functools.partial(kernels.attention_scores, backend="torch"))


@functools.cache
def _preset(name: str, evict: bool) -> dict:
    over = {}
    if evict and name != "full":  # merging and per-token decode rules change the cache: the reference masks only
        over = {"reducer": {"name": "evict"}, "decode": {"name": "append"}}
    return preset(name, **over)


def policy(name: str, budget: float, evict: bool = False):
    return build_policy(copy.deepcopy(_preset(name, evict)), budget)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, processor = build_tiny(request.param, seed=0)
    return ADAPTERS[request.param](model, processor, "cpu")


@pytest.fixture(scope="module")
def inputs(tiny):
    return tiny.build_inputs(QUESTIONS, [[im] for im in images()])


@pytest.fixture(scope="module")
def full_run(tiny, inputs):
    return generate(tiny, build_policy(preset("full"), 1.0), inputs, STEPS)


def strip_eos(tokens: list[list[int]], eos: int) -> list[list[int]]:
    return [t[: t.index(eos)] if eos in t else t for t in tokens]


# -- image tokens and positions ----------------------------------------------------------------------------------
def test_image_spans_equal_what_the_processor_inserted(tiny, inputs):
    info = tiny.prompt_info(inputs)
    expected = tiny.processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in SIZES])["num_image_tokens"]
    if tiny.family.startswith("qwen"):
        assert expected == (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    if tiny.family in ("llava_next", "llava_onevision"):
        assert expected[0] != expected[1]  # anyres: the count depends on the image's size
    ids = inputs["input_ids"]
    for b, spans in enumerate(info.image_spans()):
        assert len(spans) == 1 and spans[0][1] - spans[0][0] == expected[b]
        start, end = spans[0]
        assert int(ids[b].eq(tiny.image_token_id).sum()) == expected[b]
        if tiny.family.startswith("qwen"):  # the markers around the span are text; the question starts after
            assert int(ids[b, start - 1]) == tiny.vision_start_token_id
            assert int(ids[b, end]) == tiny.vision_end_token_id
            assert int(info.postvision_start[b]) == end + 1
        else:
            assert int(info.postvision_start[b]) == end
    assert info.image_mask.sum(1).tolist() == expected


def test_images_at_their_place_in_the_question(tiny):
    """`<image>` in a question puts each image there (interleaved prompts, MileBench); the spans are what the
    processor inserts for those images, with the question's text before, between and after them."""
    question = "Compare the first picture <image> with the second <image> in one word."
    ids = tiny.build_inputs([question], [images()])["input_ids"]
    info = tiny.prompt_info(tiny.build_inputs([question], [images()]))
    expected = tiny.processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in SIZES])["num_image_tokens"]
    spans = info.image_spans()[0]
    assert [end - start for start, end in spans] == expected
    text = tiny.processor.tokenizer.decode(ids[0, spans[0][1]: spans[1][0]], skip_special_tokens=True)
    assert "with the second" in text
    assert "in one word" in tiny.processor.tokenizer.decode(ids[0, spans[1][1]:], skip_special_tokens=True)
    assert "first picture" in tiny.processor.tokenizer.decode(ids[0, : spans[0][0]], skip_special_tokens=True)
    with pytest.raises(ValueError, match="names 2 <image> places for 1 image"):
        tiny.build_inputs([question], [images()[:1]])


def test_positions(tiny, inputs):
    """1-D models decode from the prompt length; M-RoPE models from length + rope_delta (< length: an image of
    h x w merged tokens advances the position by max(h, w))."""
    info = tiny.prompt_info(inputs)
    position_ids, nxt = tiny.positions(inputs, info)
    if tiny.family.startswith("qwen"):
        assert position_ids.shape == (3, *inputs["input_ids"].shape)
        grid = inputs["image_grid_thw"]
        shrink = grid[:, 1:].prod(-1) // 4 - grid[:, 1:].max(-1).values // 2
        assert nxt.tolist() == (info.lengths - shrink).tolist()
        assert nxt.tolist() == (position_ids.amax((0, 2)) + 1).tolist()
    else:
        assert nxt.tolist() == info.lengths.tolist()


def test_full_matches_transformers_generate(tiny, inputs, full_run):
    """The engine's positions (M-RoPE and rope_deltas included) = transformers' own generate."""
    cfg = tiny.text_config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            ref = tiny.model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                                      pad_token_id=tiny.pad_token_id)
    finally:
        cfg._attn_implementation = saved
    expected = ref[:, inputs["input_ids"].shape[1]:].tolist()
    assert full_run.tokens == strip_eos(expected, tiny.eos_token_id)


def test_decoding_keeps_original_positions_after_compression(tiny, inputs, monkeypatch):
    seen = []
    original = tiny.decode

    def spy(tokens, positions, cache):
        seen.append(positions.clone())
        return original(tokens, positions, cache)

    monkeypatch.setattr(tiny, "decode", spy)
    generate(tiny, policy("streamingllm", 0.1), inputs, 3)
    _, nxt = tiny.positions(inputs, tiny.prompt_info(inputs))
    assert torch.equal(seen[0], nxt) and torch.equal(seen[1], nxt + 1)


# -- policies ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRESETS)
def test_budget_one_reproduces_full(tiny, inputs, full_run, name):
    out = generate(tiny, policy(name, 1.0), inputs, STEPS)
    assert out.tokens == full_run.tokens
    assert out.report.realised_budget == 1.0


@pytest.mark.parametrize("name", PRESETS[1:])
def test_compressed_decoding_equals_masked_reference(tiny, inputs, name):
    """Budget 0.5: the kept entries, decoded at the original positions = the uncompressed model with the
    evicted prompt keys masked per layer and KV head (merging reducers and per-token decode rules swapped for
    evict/append, which the reference can express; their selection is the preset's)."""
    out = generate(tiny, policy(name, 0.5, evict=True), inputs, STEPS)
    assert out.report.realised_budget < 1.0
    ref = masked_reference_generate(tiny, inputs, out.kept_positions, STEPS)
    assert out.tokens == strip_eos(ref, tiny.eos_token_id)


# -- real models and datasets: configs, offline messages ---------------------------------------------------------
def _yamls(group: str) -> dict[str, dict]:
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CONF / group).glob("*.yaml"))}


REAL_MODELS = {k: v for k, v in _yamls("model").items() if v["source"] == "hf"}
REAL_DATASETS = {k: v for k, v in _yamls("dataset").items() if v.get("source") == "lmms_eval"}  # aliases: no keys


def test_real_model_configs():
    assert {"llava15_7b", "llava15_13b", "llava16_mistral_7b", "llava16_34b", "qwen2_vl_7b", "qwen2_5_vl_7b",
            "llava_onevision_7b"} <= set(REAL_MODELS)
    for name, cfg in REAL_MODELS.items():
        assert cfg["name"] == name and cfg["family"] in ADAPTERS and cfg["dtype"] == "bfloat16"
        assert cfg["path"] is None and "/" in cfg["hf_id"] and cfg.get("device_map", None) in (None, "auto")


class _TaskLoader(yaml.SafeLoader):
    """lmms-eval task YAMLs with their `!function` tags read as plain strings."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_task(path: Path) -> dict | None:
    try:
        doc = yaml.load(path.read_text(errors="ignore"), Loader=_TaskLoader)
    except yaml.YAMLError:
        return None
    return doc if isinstance(doc, dict) else None


@functools.cache
def lmms_eval_tasks() -> dict[str, dict]:
    """task name -> its YAML (one `include` level resolved), read as text: importing lmms-eval costs seconds."""
    import importlib.util

    root = Path(importlib.util.find_spec("lmms_eval").submodule_search_locations[0]) / "tasks"
    tasks = {}
    for path in root.rglob("*.yaml"):
        doc = _read_task(path)
        if doc is None or not isinstance(doc.get("task"), str):
            continue
        if isinstance(doc.get("include"), str) and (base := _read_task(path.parent / doc["include"])):
            doc = {**base, **doc}
        tasks[doc["task"]] = doc
    return tasks


def test_real_dataset_configs_name_lmms_eval_tasks():
    assert {"docvqa_val", "docvqa_val_lite", "coco2017_cap_val", "coco2017_cap_val_lite", "textvqa_val",
            "chartqa", "mathvista_testmini"} <= set(REAL_DATASETS)
    tasks = lmms_eval_tasks()
    for name, cfg in REAL_DATASETS.items():
        task = tasks[cfg["task"]]
        assert cfg["hf_dataset"] == task["dataset_path"], name
        metrics = [m["metric"] for m in task["metric_list"]]
        assert cfg["metric"] in metrics or cfg["metric"].removeprefix("coco_") in [m.removeprefix("coco_")
                                                                                   for m in metrics], name
        assert "limit" in cfg and "seed" in cfg and cfg["path"] is None


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_offline_fails_fast_naming_the_fix(name):
    cfg = REAL_MODELS[name]
    t0 = time.perf_counter()
    with pytest.raises(MissingResource) as err:
        check_model(cfg)
    assert time.perf_counter() - t0 < 10
    assert cfg["hf_id"] in str(err.value) and "model.path=" in str(err.value) and "hf download" in str(err.value)


@pytest.mark.parametrize("name", sorted(REAL_DATASETS))
def test_real_dataset_offline_fails_fast_naming_the_fix(name):
    from vlcache.eval.tasks import check_dataset

    cfg = REAL_DATASETS[name]
    t0 = time.perf_counter()
    with pytest.raises(MissingResource) as err:
        check_dataset(cfg)
    assert time.perf_counter() - t0 < 10
    assert cfg["hf_dataset"] in str(err.value) and "dataset.path=" in str(err.value)


@pytest.mark.parametrize("experiment", ["vlcache_paper", "elastic_paper", "lookm_paper"])
def test_paper_experiments_compose(experiment):
    """Every model, dataset and policy an experiment sweeps exists, and its budgets are in (0, 1]."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    for group in ("model", "dataset", "policy"):
        values = str(params.get(group, cfg[group].name)).split(",")
        for value in values:
            assert (CONF / group / f"{value.strip()}.yaml").exists(), (experiment, group, value)
    assert all(0 < float(b) <= 1 for b in str(params.budget).split(","))
    assert cfg.sweep_name == experiment


def test_seeded_subset_keeps_both_copies_aligned():
    """`dataset.seed` with a limit: the same seeded sample of the split in the task's dataset and in lmms-eval's
    image-free copy; without a seed nothing changes (lmms-eval's limit takes the first samples)."""
    from types import SimpleNamespace

    from datasets import Dataset, DatasetDict

    from vlcache.eval.tasks import sample_subset

    def task():
        data = DatasetDict({"validation": Dataset.from_dict({"q": list(range(50))})})
        no_media = DatasetDict({"validation": Dataset.from_dict({"q": list(range(50))})})
        return SimpleNamespace(config=SimpleNamespace(test_split="validation", validation_split=None),
                               dataset=data, dataset_no_image=no_media)

    a, b, c = task(), task(), task()
    sample_subset(a, 10, 3)
    sample_subset(b, 10, 3)
    sample_subset(c, 10, None)
    picked = a.dataset["validation"]["q"]
    assert len(picked) == 10 and picked == sorted(picked) and picked != list(range(10))
    assert a.dataset_no_image["validation"]["q"] == picked == b.dataset["validation"]["q"]
    assert c.dataset["validation"]["q"] == list(range(50))


def test_real_size_check_presets_match_conf():
    """experiments/real_size_check.py runs where Hydra is not installed from a snapshot of the presets."""
    import json

    from omegaconf import OmegaConf  # noqa: F401  (the composition below needs Hydra)

    path = ROOT / "experiments" / "real_size_presets.json"
    snapshot = json.loads(path.read_text())
    for name in PRESETS:
        assert snapshot[name] == preset(name), f"{path.name} is stale: python experiments/real_size_check.py " \
                                               "--dump-presets"
