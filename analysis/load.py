"""Result folders (and W&B runs) into tidy pandas frames: one row per job, or one row per sample.

A job folder is any folder under the given paths that holds `metrics.json`, `config.yaml` or Hydra's
`.hydra/config.yaml` (vlcache/results.py writes the first two; Hydra writes the last when a job starts).
Its `status` column is what metrics.json says (`ok` or `failed`), or `incomplete` when there is no
metrics.json yet (a job still running, or killed): nothing is dropped, so a figure can show what is missing.

Columns: `sweep` (the folder above the job: the W&B group), `job` (the folder name: the job's overrides),
`path`, `status`, `error`, the identity `model`, `dataset`, `policy`, `budget`, every metrics.json field
(nested dicts flattened with dots: `metrics.anls`, `versions.torch`; lists such as `layer_budgets` kept as
lists), and the resolved config flattened with dots (`policy.scorer.name`, `dataset.task`, `batch_size`).
Where a config key has the same name as a metrics.json field (`budget`, `seed`, `device`) the metrics value
wins and the config value is kept as `config.<key>` (e.g. `config.device` = "auto", `device` = the GPU name).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

METRICS, SAMPLES, CONFIG = "metrics.json", "samples.jsonl", "config.yaml"
IDENTITY = ("model", "dataset", "policy", "budget")
FRONT = ("sweep", "job", "status", *IDENTITY, "accuracy", "metric", "realised_budget", "n_samples", "error")
# Folders that are never job folders even though they may hold a config.yaml.
SKIP_DIRS = {".hydra", "wandb", "__pycache__", ".ipynb_checkpoints"}

PathsLike = str | Path | Iterable[str | Path]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys; lists and scalars are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _as_paths(paths: PathsLike) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def job_dirs(paths: PathsLike) -> list[Path]:
    """Every job folder under `paths` (recursively), in a stable order; a path may itself be a job folder."""
    found: set[Path] = set()
    for root in _as_paths(paths):
        if not root.exists():
            raise FileNotFoundError(f"no results at {root}: run a sweep first (python run.py -m ...)")
        candidates = [root, *(p for p in root.rglob("*") if p.is_dir())]
        for folder in candidates:
            if SKIP_DIRS & set(folder.relative_to(root).parts):
                continue
            if any((folder / name).is_file() for name in (METRICS, CONFIG, ".hydra/config.yaml")):
                found.add(folder.resolve())
    return sorted(found)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a half-written or missing file: the job counts as incomplete
    return data if isinstance(data, dict) else None


# metrics.json fields that are also top-level config keys: a column holds one meaning in every row, so the
# config's value always goes to `config.<key>`, also for a job without metrics.json.
METRIC_KEYS = {"budget", "seed", "device", "status", "error"}


def _files(job_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    config = _read_yaml(job_dir / CONFIG) or _read_yaml(job_dir / ".hydra" / "config.yaml")
    return config, _read_json(job_dir / METRICS)


def read_job(job_dir: Path, metric_keys: set[str] = METRIC_KEYS) -> dict[str, Any]:
    """One job folder as a flat row (see the module docstring for the columns). Config keys in `metric_keys`
    (or in this job's metrics.json) are renamed `config.<key>`."""
    config, metrics = _files(job_dir)
    row: dict[str, Any] = {"sweep": job_dir.parent.name, "job": job_dir.name, "path": str(job_dir)}
    flat_config = flatten(config)
    flat_metrics = flatten(metrics or {})
    for key, value in flat_config.items():
        row[f"config.{key}" if key in flat_metrics or key in metric_keys else key] = value
    row.update(flat_metrics)
    # The identity comes from metrics.json; a job without one (incomplete) takes it from its config.
    for key in IDENTITY:
        if row.get(key) is None:
            row[key] = flat_config.get(f"{key}.name", flat_config.get(key))
    row["status"] = (metrics or {}).get("status", "incomplete")
    row.setdefault("error", None)
    return row


def _order(df: pd.DataFrame) -> pd.DataFrame:
    front = [c for c in FRONT if c in df.columns]
    df = df[front + [c for c in df.columns if c not in front]]
    if "budget" in df.columns:
        df["budget"] = pd.to_numeric(df["budget"], errors="coerce")
    keys = [c for c in ("sweep", "model", "dataset", "policy", "budget", "job") if c in df.columns]
    return df.sort_values(keys, na_position="last", kind="stable").reset_index(drop=True)


def load_jobs(paths: PathsLike) -> pd.DataFrame:
    """One row per job folder found under `paths` (sweep folders, output roots, or job folders)."""
    folders = job_dirs(paths)
    keys = set(METRIC_KEYS)
    for folder in folders:  # every metrics.json field seen in these results
        keys.update(flatten(_files(folder)[1] or {}))
    rows = [read_job(d, keys) for d in folders]
    if not rows:
        return pd.DataFrame(columns=list(FRONT) + ["path"])
    return _order(pd.DataFrame(rows))


def load_samples(paths: PathsLike) -> pd.DataFrame:
    """One row per sample of every job under `paths`: the job's identity columns, then samples.jsonl's fields
    (`scores` flattened to `scores.<metric>`). Jobs without samples (failed, incomplete) add no rows."""
    rows = []
    for job_dir in job_dirs(paths):
        sample_file = job_dir / SAMPLES
        if not sample_file.is_file():
            continue
        job = read_job(job_dir)
        ident = {k: job.get(k) for k in ("sweep", "job", "path", "status", *IDENTITY, "metric")}
        for line in sample_file.read_text().splitlines():
            if line.strip():
                rows.append({**ident, **flatten(json.loads(line))})
    if not rows:
        return pd.DataFrame(columns=["sweep", "job", "path", "status", *IDENTITY, "metric"])
    return _order(pd.DataFrame(rows))


WANDB_STATUS = {"finished": "ok", "failed": "failed", "crashed": "failed", "killed": "failed",
                "running": "incomplete", "pending": "incomplete"}


def load_wandb(project: str, filters: dict | None = None, api: Any = None) -> pd.DataFrame:
    """The W&B runs of `project` ("entity/project" or "project") as the same kind of frame as `load_jobs`:
    one row per run, the logged config flattened with dots, the run summary (metrics.json's scalars and
    `metric/<name>`), `sweep` = the run's group, `job` = its name, `status` from the summary or run state.

    `filters` is passed to `wandb.Api().runs` (MongoDB-style, e.g. `{"group": "vlcache_paper"}`).
    """
    if api is None:
        import wandb  # imported here: it costs seconds and most analyses never need it

        api = wandb.Api()
    rows = []
    for run in api.runs(project, filters=filters or {}):
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        row: dict[str, Any] = {"sweep": run.group, "job": run.name, "path": f"wandb:{run.path}"
                               if isinstance(run.path, str) else "wandb:" + "/".join(run.path)}
        flat_config = flatten(config)
        flat_summary = flatten(summary)
        for key, value in flat_config.items():
            row[f"config.{key}" if key in flat_summary else key] = value
        row.update(flat_summary)
        for key in IDENTITY:
            if row.get(key) is None:
                row[key] = flat_config.get(f"{key}.name", flat_config.get(key))
        row["status"] = summary.get("status") or WANDB_STATUS.get(run.state, run.state)
        row.setdefault("error", None)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=list(FRONT) + ["path"])
    return _order(pd.DataFrame(rows))
