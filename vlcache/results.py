"""Per-job output files (design.md): metrics.json, samples.jsonl, config.yaml; resume; the W&B mirror.

A job is finished when its metrics.json says `"status": "ok"`. Files are written through a temporary file
and renamed, metrics.json last, so a crash never leaves a half-written result that looks finished.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

METRICS, SAMPLES, CONFIG = "metrics.json", "samples.jsonl", "config.yaml"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(job_dir: str | Path) -> dict | None:
    path = Path(job_dir) / METRICS
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_finished(job_dir: str | Path) -> bool:
    metrics = read_metrics(job_dir)
    return metrics is not None and metrics.get("status") == "ok"


def read_samples(job_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(job_dir) / SAMPLES
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_config(job_dir: Path, yaml_text: str) -> None:
    _atomic_write(job_dir / CONFIG, yaml_text)


def write_samples(job_dir: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_write(job_dir / SAMPLES, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def write_metrics(job_dir: Path, metrics: dict[str, Any]) -> None:
    _atomic_write(job_dir / METRICS, json.dumps(metrics, indent=2, default=str) + "\n")


def write_failure(job_dir: Path, identity: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    metrics = {
        **identity,
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "traceback": "".join(traceback.format_exception(exc)),
    }
    write_metrics(job_dir, metrics)
    return metrics


class WandbMirror:
    """One W&B run per job, grouped by sweep; offline when no API key is set (sync later with `wandb sync`)."""

    def __init__(self, cfg: dict, job_dir: Path, config: dict, group: str, name: str) -> None:
        import wandb

        mode = cfg.get("mode") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=cfg.get("project", "vlcache"),
            entity=cfg.get("entity"),
            mode=mode,
            dir=str(job_dir),
            group=group,
            name=name,
            config=config,
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        import wandb

        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        flat.update({f"metric/{k}": v for k, v in metrics.get("metrics", {}).items()})
        self.run.summary.update(flat)
        self.run.log({k: v for k, v in flat.items() if isinstance(v, (int, float))})
        if samples:
            columns = sorted({k for row in samples for k in row})
            table = wandb.Table(columns=columns)
            for row in samples:
                table.add_data(*[json.dumps(row.get(c), default=str) if isinstance(row.get(c), (list, dict))
                                 else row.get(c) for c in columns])
            self.run.log({"samples": table})

    def log_figures(self, job_dir: Path) -> None:
        """Logs the job's per-layer budget / sparsity plot (analysis.allocation) as a wandb.Image."""
        import wandb

        metrics = read_metrics(job_dir) or {}
        if not metrics.get("layer_budgets"):
            return
        try:  # analysis/ sits next to run.py; an installed vlcache without it still logs everything else
            import matplotlib.pyplot as plt

            from analysis.allocation import job_allocation_figure
        except ImportError:
            return
        fig = job_allocation_figure(metrics)
        self.run.log({"figures/layer_allocation": wandb.Image(fig)})
        plt.close(fig)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
