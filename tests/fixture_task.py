"""A tiny local lmms-eval task written on the fly (so tests never depend on the shipped data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}

UTILS = '''
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    pred = results[0].strip().lower()
    return {"exact_match": float(pred == doc["answer"])}
'''

YAML = """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: test.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_fixture_task(
    root: Path, name: str = "fixture_qa", n: int = 6, seed: int = 0, corrupt: tuple[int, ...] = (),
    long: tuple[int, ...] = (),
) -> Path:
    """Writes `root/<name>/{<name>.yaml, utils.py, test.parquet}`: 'Which colour is the square?'.

    Samples in `corrupt` get bytes that are no image; samples in `long` get a question of 9,000 characters
    (longer than the tiny model's 8,192 positions)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(seed)
    rows = {"id": [], "question": [], "answer": [], "image": []}
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        arr = np.full((336, 336, 3), 255, dtype=np.uint8)
        x, y = rng.integers(0, 336 - 60, size=2)
        arr[y : y + 60, x : x + 60] = COLOURS[colour]
        rows["id"].append(f"{name}-{i}")
        question = "Which colour is the square?" + " Answer briefly." * (i % 2)
        rows["question"].append(question + " x" * 4500 if i in long else question)
        rows["answer"].append(colour)
        rows["image"].append({"bytes": b"not an image", "path": None} if i in corrupt else Image.fromarray(arr))
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    features = Features({"id": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "image": ImageFeature()})
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "test.parquet"))
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{name}.yaml").write_text(YAML.format(name=name))
    return root
