"""MileBench from a synthetic release in the official layout: loading through run.py, prompts, image order, scoring
(hand-checked against MileBench's evaluate.py rules), and the missing-data error."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from PIL import Image

from vlcache.data import milebench as mb
from vlcache.eval.job import validate
from vlcache.models.hub import MissingResource

ROOT = Path(__file__).resolve().parent.parent
COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]


def _write_dataset(root: Path, name: str, question_type: str, samples: list[dict]) -> None:
    """`root/<name>/<name>.json` + `root/<name>/images/*.png` as the release has them; each sample's images are
    solid colours COLOURS[0], COLOURS[1], ... in `images_path` order."""
    images = root / name / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = []
    for i, s in enumerate(samples):
        paths = []
        for k in range(s["n_images"]):
            arr = np.zeros((40, 40, 3), dtype=np.uint8) + np.array(COLOURS[k], dtype=np.uint8)
            arr[:2, :2] = np.random.default_rng(i * 10 + k).integers(0, 255, (2, 2, 3))  # random, colour kept
            Image.fromarray(arr).save(images / f"{i}_{k}.png")
            paths.append(f"{i}_{k}.png")
        instance = {"context": s["context"], "images_path": paths}
        if "choices" in s:
            instance["choice_list"] = s["choices"]
        data.append({"sample_id": i, "task_instruction_id": i % 2, "task_instance": instance,
                     "response": s["response"], "image_quantity_level": "Few"})
    meta = {"dataset": name, "split": "core", "num_sample": len(data), "question_type": question_type,
            "task_instruction": [f"{name} instruction zero.", f"{name} instruction one."]}
    (root / name / f"{name}.json").write_text(json.dumps({"meta_data": meta, "data": data}))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("MileBench")
    choices = ["red apple", "green pear", "blue sky", "yellow sun"]
    for name in mb.GROUPS["t1"]:
        _write_dataset(root, name, "multi-choice", [
            {"n_images": 2, "context": "Frames: {image#1}{image#2}Question: what next?", "choices": choices,
             "response": "green pear"},
            {"n_images": 3, "context": "{image#1} then {image#2} then {image#3} Question: which?",
             "choices": choices, "response": "blue sky"},
        ])
    _write_dataset(root, "IEdit", "open-ended", [
        {"n_images": 2, "context": "Source Image:{image#1} Target Image:{image#2}Instruction:",
         "response": "remove the two people"}])
    _write_dataset(root, "GPR1200", "multi-choice", [
        {"n_images": 3, "context": "{image#1}{image#2}{image#3}Which matches?", "choices": ["x1", "x2", "x3"],
         "response": "x2"}])
    return root


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_dataset_and_column_has_a_config_and_a_task():
    assert len(mb.DATASETS) == 29 and len(set(mb.DATASETS)) == 29
    for key in [*mb.GROUPS, *mb.DATASETS]:
        task = mb.task_name(key)
        assert (ROOT / "conf" / "dataset" / f"{task}.yaml").is_file()
        assert (ROOT / "vlcache" / "data" / "tasks" / task / f"{task}.yaml").is_file()


def test_prompt_has_instruction_choices_and_image_references(release):
    docs = mb.load_docs(release, ["ActionLocalization"])
    assert [d["id"] for d in docs] == ["ActionLocalization-0", "ActionLocalization-1"]
    text = mb.doc_to_text(docs[1])
    assert text == ("ActionLocalization instruction one.\n<image> then <image> then <image> Question: "
                    "which?\nChoice list: \nA. red apple\nB. green pear\nC. blue sky\nD. yellow sun\n"
                    "Your answer is: ")
    # a context that does not name each image once: MileBench's references, the images going first
    odd = dict(docs[1], context=docs[1]["context"].replace("{image#3}", "{image#1}"))
    assert mb.doc_to_text(odd).startswith("ActionLocalization instruction one.\n<Image 1>  then <Image 2>  then "
                                          "<Image 1>  Question: ")
    (gpr,) = mb.load_docs(release, ["GPR1200"])
    assert mb.doc_to_text(gpr).endswith("Which matches?\nChoice list: \nx1\nx2\nx3\nYour answer is: ")
    (iedit,) = mb.load_docs(release, ["IEdit"])
    assert "Choice list" not in mb.doc_to_text(iedit) and mb.doc_to_target(iedit) == "remove the two people"


def test_images_come_in_images_path_order(release):
    for doc in mb.load_docs(release, mb.GROUPS["t1"]):
        images = mb.doc_to_visual(doc)
        assert [tuple(np.asarray(im)[20, 20]) for im in images] == COLOURS[: len(doc["images"])]


@pytest.mark.parametrize("pred, gt, expected", [
    ("B", "green pear", 1.0),
    ("B. green pear", "green pear", 1.0),
    ("The answer is Green Pear.", "green pear", 1.0),  # option text, case and punctuation normalised
    ("A", "green pear", 0.0),
    ("D. yellow sun", "green pear", 0.0),
    ("", "blue sky", 1.0),  # evaluate.py: an empty reply counts as option C
    ("", "green pear", 0.0),
])
def test_multi_choice_scoring(pred, gt, expected):
    doc = {"dataset": "ActionSequence", "question_type": "multi-choice", "response": gt,
           "choice_list": ["red apple", "green pear", "blue sky", "yellow sun"]}
    assert mb.process_results(doc, [pred]) == {"score": {"dataset": "ActionSequence", "score": expected}}


def test_needle_and_open_ended_scoring():
    needle = {"dataset": "TextNeedleInAHaystack", "question_type": "open-ended", "response": "42"}
    assert mb.score_sample(needle, "The password is 42.") == 1.0
    assert mb.score_sample(needle, "The password is 420") == 0.0  # a word of the reply, not a substring
    coqa = {"dataset": "MMCoQA", "question_type": "open-ended", "response": "Paris"}
    assert mb.score_sample(coqa, "It is Paris, France") == 1.0
    pytest.importorskip("rouge")
    iedit = {"dataset": "IEdit", "question_type": "open-ended", "response": "the cat sat on the mat"}
    # the `rouge` package counts distinct words: LCS 3, reply 3, reference 5 ("the" twice): P = 1, R = 0.6,
    # F = 2 * 0.6 / 1.6 = 0.75
    assert mb.score_sample(iedit, "The cat sat") == pytest.approx(0.75, abs=1e-6)
    assert mb.score_sample(iedit, "") == 0.0


def test_dataset_mean_weights_datasets_equally():
    items = [{"dataset": "A", "score": 1.0}, {"dataset": "A", "score": 0.0}, {"dataset": "B", "score": 1.0}]
    assert mb.dataset_mean(items) == pytest.approx(0.75)


def test_missing_release_fails_fast_naming_the_fix(tmp_path):
    with pytest.raises(MissingResource, match=r"dataset\.path=/path/to/folder.*hf download FreedomIntelligence/"
                                              r"MileBench --repo-type dataset"):
        validate(_cfg("dataset=milebench_t1", "model=tiny_random"))
    with pytest.raises(MissingResource, match=r"lacks ActionLocalization/ActionLocalization\.json"):
        validate(_cfg("dataset=milebench_t1", "model=tiny_random", f"dataset.path={tmp_path}"))


def _only_job(root) -> tuple[dict, list[dict]]:
    """The metrics and samples of the one job run.py wrote under `root`."""
    (job,) = (root / "runs").iterdir()
    rows = [json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()]
    return json.loads((job / "metrics.json").read_text()), rows


def test_run_py_evaluates_a_column(tmp_path, release):
    result = run_cli("model=tiny_random", "dataset=milebench_t1", f"dataset.path={release}", "max_new_tokens=4",
                     "policy=streamingllm", "budget=0.5", f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, rows = _only_job(tmp_path)
    assert metrics["status"] == "ok" and metrics["n_samples"] == 6 and metrics["n_failed_samples"] == 0
    assert metrics["metric"] == "score" and 0.0 <= metrics["accuracy"] <= 1.0
    assert [r["reference"] for r in rows] == ["green pear", "blue sky"] * 3
    per_image = rows[0]["image_tokens"] // 2
    assert per_image > 0 and [r["image_tokens"] for r in rows] == [2 * per_image, 3 * per_image] * 3


def test_run_py_cuts_prompts_to_max_context_len(tmp_path, release, tiny_adapter):
    """LOOK-M's cut through run.py: with 800 tokens (576 per image, one token per character), each sample keeps its
    last image and the text after it (and " then " in sample 1), and the model gets only the kept images."""
    result = run_cli("model=tiny_random", "dataset=milebench_t1", f"dataset.path={release}", "max_new_tokens=4",
                     "policy=full", "max_context_len=800", f"output_root={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, rows = _only_job(tmp_path)
    assert metrics["status"] == "ok" and metrics["n_samples"] == 6 and metrics["n_failed_samples"] == 0
    # sample 0, "Frames: {image#1}{image#2}Question: ...": "Frames: " (8) and image 1 dropped; sample 1,
    # "{image#1} then {image#2} then {image#3} Question: ...": images 1, 2 and the first " then " (6) dropped
    assert [r["cut_images"] for r in rows] == [1, 2] * 3
    assert [r["cut_text_tokens"] for r in rows] == [8, 6] * 3
    assert [r["image_tokens"] for r in rows] == [576] * 6  # was [1152, 1728]: the model got one image each
    # the uncut prompts, built as the job builds them, are longer by exactly what the cut dropped
    docs = mb.load_docs(release, mb.GROUPS["t1"])
    for doc, row in zip(docs, rows):
        full = tiny_adapter.build_inputs([mb.doc_to_text(doc)], [mb.doc_to_visual(doc)])
        uncut = int(full["attention_mask"].sum())
        assert uncut - row["prompt_tokens"] == 576 * row["cut_images"] + row["cut_text_tokens"]


def test_cut_left_cuts_the_last_fragment_with_the_model_tokenizer(release, tiny_adapter):
    from vlcache.eval.lmms_model import VLCacheLMM, _Sample

    (doc,) = mb.load_docs(release, ["IEdit"])
    lm = VLCacheLMM(tiny_adapter, None, max_context_len=len(doc["instruction"]) + 10)
    sample = _Sample(key=("t", 0), question=mb.doc_to_text(doc), images=mb.doc_to_visual(doc))
    lm._cut_context(sample, doc)
    # "Source Image:{image#1} Target Image:{image#2}Instruction:": its last fragment, 12 characters, cut to its
    # last 10; both images and the 13 + 14 characters before them dropped
    assert sample.question == "IEdit instruction zero.\nstruction:" and sample.images == []
    assert sample.cut == (13 + 14 + 2, 2)
