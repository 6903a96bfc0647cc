"""Sweep progress on the terminal: a Hydra callback registered in conf/config.yaml (`hydra.callbacks`).

After each job of a multirun it prints to stderr

    [vlcache] jobs 7/24 done (1 failed, 2 skipped) · 3.4 samples/s · ETA 5m10s

N is counted the way Hydra's basic sweeper expands the sweep (command line and `hydra.sweeper.params`); with
another sweeper N is unknown and the line says so. Throughput counts the samples of jobs that ran in this
sweep over their wall time (model loading included, so the ETA is honest); skipped jobs (already finished)
count as done and cost nothing. The callback keeps its counts in the process that runs the jobs: Hydra's
basic launcher runs them one after another in the sweep's own process, which is where this is useful.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def count_jobs(config: DictConfig) -> int | None:
    """Jobs in the sweep as the basic sweeper expands it, or None for any other sweeper."""
    hydra_cfg = config.get("hydra") if isinstance(config, DictConfig) else None
    if hydra_cfg is None or not str(hydra_cfg.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        params = hydra_cfg.sweeper.get("params")
        params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
        args = [f"{k}={v}" for k, v in params.items()] + list(hydra_cfg.overrides.task)
        overrides = OverridesParser.create().parse_overrides(args)
        return sum(len(chunk) for chunk in BasicSweeper.split_arguments(overrides, None))
    except Exception:  # an exotic sweep syntax: progress without N rather than a failed sweep
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class SweepProgress(Callback):
    """Counts finished, failed and skipped jobs of a multirun and prints one progress line per job."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.total: int | None = None
        self.active = False
        self.done = self.failed = self.skipped = 0
        self.samples = 0
        self.run_seconds = 0.0
        self.job_started: float | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.active = True
        self.total = count_jobs(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_started = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not self.active:
            return  # a single run: nothing to count
        elapsed = time.perf_counter() - self.job_started if self.job_started is not None else 0.0
        metrics = self._metrics(job_return)
        self.done += 1
        if metrics.get("skipped"):
            self.skipped += 1
        else:
            self.run_seconds += elapsed
            if metrics.get("status") != "ok":
                self.failed += 1
            self.samples += int(metrics.get("n_samples") or 0)
        print(self.line(), file=self.stream or sys.stderr, flush=True)

    def line(self) -> str:
        total = "?" if self.total is None else str(self.total)
        parts = [f"[vlcache] jobs {self.done}/{total} done ({self.failed} failed, {self.skipped} skipped)"]
        rate = self.samples / self.run_seconds if self.run_seconds > 0 else 0.0
        parts.append(f"{rate:.2f} samples/s")
        ran = self.done - self.skipped
        if self.total is not None and ran > 0:
            parts.append(f"ETA {_duration(self.run_seconds / ran * max(self.total - self.done, 0))}")
        else:
            parts.append("ETA ?")
        return " · ".join(parts)

    @staticmethod
    def _metrics(job_return: Any) -> dict[str, Any]:
        """run.py's return value (it carries `skipped`), else the job's metrics.json, else a failure."""
        value = getattr(job_return, "return_value", None) if _succeeded(job_return) else None
        if isinstance(value, dict):
            return value
        out_dir = None
        try:
            out_dir = job_return.hydra_cfg.hydra.runtime.output_dir
        except Exception:
            pass
        if out_dir:
            try:
                return json.loads((Path(out_dir) / "metrics.json").read_text())
            except (OSError, json.JSONDecodeError):
                pass
        return {"status": "failed"}


def _succeeded(job_return: Any) -> bool:
    try:
        from hydra.core.utils import JobStatus

        return job_return.status == JobStatus.COMPLETED
    except Exception:  # not a Hydra JobReturn (tests): trust its return value
        return True
