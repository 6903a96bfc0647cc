"""Regenerates the shipped test splits: `python -m vlcache.data.build [--tasks ...] [--out DIR]`.

Each task's `test.parquet` (next to its lmms-eval YAML in vlcache/data/tasks/<task>/) holds samples 0..N-1
of the task's test seeds (render.TEST_SIZES), written with `datasets.Dataset.to_parquet` so that the image
columns keep their `Image` feature. Images are stored as optimised PNG: lossless, so the pixels the model
sees at test time are exactly the generator's, as in training.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from vlcache.data import generators
from vlcache.data.render import TASKS, TEST_SIZES

TASK_DIR = Path(__file__).resolve().parent / "tasks"
PRIVATE = ("key", "transcript")  # generator fields that the test split does not ship


def png(img) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return {"bytes": buf.getvalue(), "path": None}


def test_samples(task: str, n: int | None = None) -> list[dict]:
    make = generators()[task]
    return [make("test", i) for i in range(TEST_SIZES[task] if n is None else n)]


def to_dataset(task: str, samples: list[dict]):
    """The samples as a `datasets.Dataset` with typed columns (image(s) as `Image`, references as lists)."""
    import datasets

    cols: dict[str, list] = {}
    feats: dict[str, object] = {}
    for key in samples[0]:
        if key in PRIVATE:
            continue
        values = [s[key] for s in samples]
        if key == "image":
            values, feats[key] = [png(v) for v in values], datasets.Image()
        elif key == "images":
            values, feats[key] = [[png(v) for v in vs] for vs in values], datasets.Sequence(datasets.Image())
        elif isinstance(values[0], list):
            feats[key] = datasets.Sequence(datasets.Value("string"))
        else:
            feats[key] = datasets.Value("string")
        cols[key] = values
    order = ["id", "question", "answer"] + [k for k in cols if k not in ("id", "question", "answer")]
    features = datasets.Features({k: feats[k] for k in order})
    return datasets.Dataset.from_dict({k: cols[k] for k in order}, features=features)


def build(task: str, out_dir: Path = TASK_DIR, n: int | None = None) -> Path:
    path = out_dir / task / "test.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_dataset(task, test_samples(task, n)).to_parquet(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--out", type=Path, default=TASK_DIR, help="folder of the task folders")
    parser.add_argument("-n", type=int, default=None, help="samples per task (default: render.TEST_SIZES)")
    args = parser.parse_args(argv)
    for task in args.tasks:
        path = build(task, args.out, args.n)
        print(f"{task}: {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
