"""MileBench (Song et al. 2024, FreedomIntelligence/MileBench) as lmms-eval tasks, read from the official release.

Layout of the release (MileBench/MileBench `generate.py`, `evaluate.py`): `<root>/<Dataset>/<Dataset>.json` =
`{"meta_data": {"task_instruction": [...], "question_type": "multi-choice" | "open-ended", ...}, "data": [{
"sample_id", "task_instruction_id", "task_instance": {"context" with {image#i} / {table#i} placeholders,
"images_path": [...], "choice_list" (multi-choice)}, "response", "image_quantity_level"}]}`, images under
`<root>/<Dataset>/images/`. The folder comes from `dataset.path`, exported as `$MILEBENCH_DIR`.

Prompt: MileBench's (`utils.py`, as LOOK-M runs it): task instruction, newline, context, then for multi-choice
"\\nChoice list: \\n" + "A. ..." lines (GPR1200: the options without letters) + "\\nYour answer is: ". Each
image goes at its placeholder (`<image>`, which vlcache's adapters expand in place: images inside the text);
a context that does not name each image exactly once gets MileBench's references for images not at their place
(its `combine_image` mode), "<Image i> ", with the images first.

Prompt cut (LOOK-M's `max_context_len`, off by default): with `max_context_len` set, the model wrapper keeps the
task instruction whole and the context to the tokens left, walked from its end, images whole
(vlcache/data/context_cut.py; `kept_instruction` says what it keeps whole). A prompt with its images first (the
"<Image i> " references above) loses its first images, and its references keep their numbers.

Scoring: a port of `evaluate.py` (LOOK-M's copy, SUSTechBruce/LOOK-M): needle sets (Text/ImageNeedleInAHaystack:
the answer is a word of the reply; MMCoQA: a substring), open-ended: ROUGE-L F of the `rouge` package,
multi-choice: option extraction (`match_choice`) and accuracy. A dataset's score is the mean over its samples; a
group's (LOOK-M's T-1..S-5, NH, IR columns) the unweighted mean of its datasets' scores (MileBench Table 6).

`python -m vlcache.data.milebench` rewrites the task folders (vlcache/data/tasks/milebench_*) and dataset configs
(conf/dataset/milebench_*.yaml).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

ENV = "MILEBENCH_DIR"
IMAGE_PLACE = "<image>"  # vlcache.models.adapter: each image of the prompt goes where the text names it

TEMPORAL = {
    "t1": ["ActionLocalization", "ActionPrediction", "ActionSequence"],
    "t2": ["ObjectExistence", "ObjectInteraction", "MovingAttribute", "ObjectShuffle"],
    "t3": ["EgocentricNavigation", "MovingDirection"],
    "t4": ["CounterfactualInference", "StateChange", "CharacterOrder", "SceneTransition"],
}
SEMANTIC = {
    "s1": ["WebQA", "TQA", "MultiModalQA", "WikiVQA"],
    "s2": ["SlideVQA", "OCR-VQA", "DocVQA"],
    "s3": ["CLEVR-Change", "Spot-the-Diff", "IEdit"],
    "s4": ["MMCoQA", "ALFRED"],
    "s5": ["nuscenes"],
}
DIAGNOSTIC = {"nh": ["TextNeedleInAHaystack", "ImageNeedleInAHaystack"], "ir": ["GPR1200"]}
GROUPS = {**TEMPORAL, **SEMANTIC, **DIAGNOSTIC}  # LOOK-M Table 1's columns, in order
DATASETS = [d for members in GROUPS.values() for d in members]

HOW_TO_GET = (
    "MileBench is not on the Hub as lmms-eval data: download the release (`hf download FreedomIntelligence/"
    "MileBench --repo-type dataset --local-dir DIR` on a machine with network), extract its archives (`cd DIR && "
    "for f in MileBench_part*.tar.gz; do tar -xzf $f; done`), copy the folder holding <Dataset>/<Dataset>.json "
    "here and pass it as dataset.path=/path/to/MileBench."
)


def slug(dataset: str) -> str:
    return dataset.lower().replace("-", "_")


def task_name(key: str) -> str:
    """`milebench_<dataset slug>` for one dataset, `milebench_<t1..s5|nh|ir>` for a LOOK-M column."""
    return f"milebench_{key if key in GROUPS else slug(key)}"


def members(key: str) -> list[str]:
    return GROUPS[key] if key in GROUPS else [key]


# -- data ---------------------------------------------------------------------------------------------------------
def data_root() -> Path:
    root = os.environ.get(ENV)
    if not root:
        raise FileNotFoundError(f"${ENV} is not set: run MileBench through run.py with dataset.path=<folder>. "
                                + HOW_TO_GET)
    return Path(root)


def load_docs(root: Path, datasets: list[str]) -> list[dict]:
    """Every sample of `datasets`, in file order, as flat docs (image paths absolute)."""
    docs = []
    for name in datasets:
        path = root / name / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"MileBench file {path} not found. {HOW_TO_GET}")
        core = json.loads(path.read_text())
        meta = core["meta_data"]
        for ann in core["data"]:
            inst = ann["task_instance"]
            docs.append({
                "id": f"{name}-{ann['sample_id']}",
                "dataset": name,
                "sample_id": str(ann["sample_id"]),
                "instruction": meta["task_instruction"][ann["task_instruction_id"]],
                "context": inst["context"],
                "has_choices": "choice_list" in inst,
                "choice_list": [f"{c}" for c in inst.get("choice_list") or []],
                "response": str(ann["response"]),
                "question_type": meta["question_type"],
                "images": [str(root / name / "images" / p) for p in inst["images_path"]],
            })
    return docs


def docs_loader(datasets: list[str]):
    """A `process_docs` hook: replaces the task's placeholder split with the samples of `datasets` read from
    `$MILEBENCH_DIR`."""

    def process_docs(_placeholder):
        from datasets import Dataset, Features, Sequence, Value

        text = Value("string")
        features = Features({
            "id": text, "dataset": text, "sample_id": text, "instruction": text, "context": text,
            "has_choices": Value("bool"), "choice_list": Sequence(text), "response": text, "question_type": text,
            "images": Sequence(text),
        })
        return Dataset.from_list(load_docs(data_root(), datasets), features=features)

    return process_docs


# -- prompt -------------------------------------------------------------------------------------------------------
def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    context = doc["context"]
    if doc["has_choices"]:
        letters = doc["dataset"] != "GPR1200"  # its 100+ options go without letters (MileBench utils.py)
        context += "\nChoice list: \n" + "\n".join(
            (f"{chr(65 + i)}. " if letters else "") + f"{c}" for i, c in enumerate(doc["choice_list"])
        ) + "\nYour answer is: "
    n = len(doc["images"])
    marks = [(f"{{image#{i + 1}}}", f"{{table#{i + 1}}}") for i in range(n)]
    # each image at its place when the context names each image once; else MileBench's references for images not
    # at their place, the images going first
    in_place = n > 0 and all(context.count(a) + context.count(b) == 1 for a, b in marks)
    for i, (image, table) in enumerate(marks):
        ref = IMAGE_PLACE if in_place else f"<Image {i + 1}> "
        context = context.replace(image, ref).replace(table, ref)
    return doc["instruction"] + "\n" + context


def kept_instruction(doc: dict) -> str:
    """What LOOK-M's prompt cut (vlcache/data/context_cut.py) keeps whole of a doc's prompt: a MileBench doc's task
    instruction (`doc_to_text` puts it first, then a newline); '' for a doc of another task."""
    fields = {"dataset", "instruction", "context", "images"}
    return doc["instruction"] if fields <= set(doc) and doc["dataset"] in DATASETS else ""


def doc_to_visual(doc: dict) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in doc["images"]]


def doc_to_target(doc: dict) -> str:
    return doc["response"]


# -- scoring: MileBench evaluate.py ---------------------------------------------------------------------------------
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_REGEX_SPECIAL = ["\\", ".", "^", "$", "*", "+", "?", "{", "}", "[", "]", "|", "(", ")"]


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # evaluate.py passes re.UNICODE (32) as the positional `count` of sub: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def normalize(answer: str) -> str:
    """evaluate.py's `Eval.process`."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    answer = _punctuation(answer)
    answer = answer.strip("'").strip('"')
    return answer.strip().lower()


def _char(index: int) -> str:
    if index < 26:
        return chr(index + 65)
    if index < 52:
        return "A" + chr(index + 65 - 26)
    return "B" + chr(index + 65 - 26 - 26)


def _option_regex(option: str) -> str:
    out = normalize(option)
    for c in _REGEX_SPECIAL:
        if c in out:
            out = out.replace(c, "\\" + c)
    return out


def match_choice(text: str, options: dict[str, str]) -> str:
    """evaluate.py's `Eval.match_choice`: the option letter a (normalized) reply picks."""
    if text == "":
        return "C"
    try:
        found = re.search(rf"({'|'.join(_option_regex(f'{k} {v}') for k, v in options.items())})", text, re.S)
        if found:
            return found.group(0)[0].upper()
        squeezed = {k: _option_regex(v).replace(" ", "") for k, v in options.items()}
        found = re.search(rf"({'|'.join(squeezed.values())})", text.replace(" ", ""), re.S)
        if found:
            for k, v in squeezed.items():
                if found[0].strip() == v:
                    return k.upper()
        if len(text) in (1, 2) and text.upper() in options:
            return text.upper()
    except Exception:  # noqa: BLE001 - evaluate.py: an unmatchable reply is compared as it is
        return text
    return "".join(c.upper() for c in text if c.upper() in options)


def score_multi_choice(pred: str, gt: str, choices: list[str]) -> float:
    gt, pred, choices = normalize(gt), normalize(pred), [normalize(c) for c in choices]
    if gt not in choices:
        raise ValueError(f"MileBench answer {gt!r} is not one of its choices {choices}")
    options = {_char(i): c for i, c in enumerate(choices)}
    return float(match_choice(pred, options) == _char(choices.index(gt)))


def score_needle(pred: str, gt: str, needle: bool) -> float:
    gt, pred = normalize(gt), normalize(pred)
    return float(gt in pred.split()) if needle else float(gt in pred)


def score_rouge(pred: str, gt: str) -> float:
    try:
        from rouge import Rouge
    except ImportError as exc:  # pragma: no cover - environment
        raise ImportError("MileBench scores open-ended answers with the `rouge` package: pip install rouge==1.0.1"
                          ) from exc
    gt, pred = normalize(gt), normalize(pred)
    if gt == "":
        raise ValueError("MileBench open-ended sample with an empty reference")
    if pred == "":
        return 0.0
    return float(Rouge().get_scores(pred, gt)[0]["rouge-l"]["f"])


def score_sample(doc: dict, pred: str) -> float:
    """evaluate.py's dispatch: needle sets and MMCoQA by name, then the file's question_type."""
    name = doc["dataset"]
    if "NeedleInAHaystack" in name or "MMCoQA" in name:
        return score_needle(pred, doc["response"], needle="NeedleInAHaystack" in name)
    if doc["question_type"] == "open-ended":
        return score_rouge(pred, doc["response"])
    if doc["question_type"] == "multi-choice":
        return score_multi_choice(pred, doc["response"], list(doc["choice_list"]))
    raise ValueError(f"MileBench question_type {doc['question_type']!r} of {name} is not supported")


def process_results(doc: dict, results: list[str]) -> dict[str, dict]:
    pred = results[0] if results else ""
    return {"score": {"dataset": doc["dataset"], "score": score_sample(doc, pred)}}


def dataset_mean(items: list[dict]) -> float:
    """The mean of each dataset's mean score (one dataset: its mean; a group: MileBench's unweighted mean)."""
    per: dict[str, list[float]] = {}
    for item in items:
        per.setdefault(item["dataset"], []).append(item["score"])
    means = [sum(v) / len(v) for v in per.values()]
    return sum(means) / len(means) if means else float("nan")


# -- task folders and dataset configs -------------------------------------------------------------------------------
TASK_YAML = """# MileBench {what}, read from the official release in dataset.path (vlcache/data/milebench.py).
# Written by `python -m vlcache.data.milebench`.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: ../milebench_placeholder.jsonl
test_split: test
output_type: generate_until
process_docs: !function utils.process_docs
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: 512
  until: []
  temperature: 0
  do_sample: false
metric_list:
  - metric: score
    aggregation: !function utils.dataset_mean
    higher_is_better: true
metadata:
  version: 1.0
"""

TASK_UTILS = '''"""lmms-eval hooks of {task} (vlcache/data/milebench.py): MileBench
{what}."""

from vlcache.data.milebench import (  # noqa: F401
    dataset_mean,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    docs_loader,
    process_results,
)

process_docs = docs_loader({datasets!r})
'''

DATASET_YAML = """# MileBench {what}
# (LOOK-M's benchmark), from the official release: dataset.path=/path/to/MileBench, the folder holding
# <Dataset>/<Dataset>.json and <Dataset>/images/ (vlcache/data/milebench.py says how to get it).
# Metric `score`: {metric}. Written by `python -m vlcache.data.milebench`.
name: {task}
task: {task}
source: embedded
task_dir: null
path: null
path_env: {env}
path_requires: {requires}
path_help: "{help}"
metric: score
limit: null
seed: null
"""


def _describe(key: str) -> tuple[str, str]:
    if key in GROUPS:
        column = key.upper() if key in DIAGNOSTIC else f"{key[0].upper()}-{key[1]}"
        return (f"column {column} ({', '.join(GROUPS[key])})",
                "the unweighted mean of its datasets' scores")
    return f"dataset {key}", "accuracy (multi-choice, needle) or ROUGE-L F (open-ended), per evaluate.py"


def write_files(repo: Path) -> list[Path]:
    tasks = repo / "vlcache" / "data" / "tasks"
    written = []
    (tasks / "milebench_placeholder.jsonl").write_text('{"placeholder": 0}\n')
    for key in [*GROUPS, *DATASETS]:
        task = task_name(key)
        what, metric = _describe(key)
        folder = tasks / task
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text('"""Package data (listed so that setuptools ships it)."""\n')
        (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, what=what))
        (folder / "utils.py").write_text(TASK_UTILS.format(task=task, what=what, datasets=members(key)))
        requires = json.dumps([f"{d}/{d}.json" for d in members(key)])
        config = repo / "conf" / "dataset" / f"{task}.yaml"
        config.write_text(DATASET_YAML.format(task=task, what=what, metric=metric, env=ENV, requires=requires,
                                              help=HOW_TO_GET))
        written += [folder, config]
    return written


if __name__ == "__main__":
    for p in write_files(Path(__file__).resolve().parents[2]):
        print(p)
