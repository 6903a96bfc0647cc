"""vlcache's entry point: one Hydra job = one (model, dataset, policy, budget).

    python run.py                                   # the embedded default job
    python run.py policy=vlcache budget=0.1 dataset=docvqa
    python run.py -m policy=full,streamingllm budget=0.1,1.0
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vlcache import results
from vlcache.eval.job import identity, run_job
from vlcache.gpu_pool import gpu_count, hold_gpu

log = logging.getLogger("vlcache")



def _writable(root: str) -> str:
    """Resolves `output_root`, failing with a clear message (before anything loads) if it cannot be written."""
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".vlcache-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"output_root={root!r} is not writable ({exc.strerror}); set output_root=<a writable folder>"
        ) from None
    return root


# Job folders are named by their overrides; the job with no override gets a name too.
OmegaConf.register_new_resolver("job_dirname", lambda s: s or "default", replace=True)
OmegaConf.register_new_resolver("writable", _writable, replace=True)
OmegaConf.register_new_resolver("gpu_count", gpu_count, replace=True)


def _route_loguru() -> None:
    """lmms-eval logs through loguru: send it to the job's log instead of stderr."""
    try:
        from loguru import logger
    except ImportError:
        return
    logger.remove()
    lmms_log = logging.getLogger("lmms_eval")
    logger.add(lambda msg: lmms_log.log(msg.record["level"].no, msg.record["message"]), level="INFO")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    _route_loguru()
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    try:
        one_gpu = not cfg.model.get("device_map")  # a model split with device_map uses every GPU itself
        if cfg.device == "auto" and hc.mode == RunMode.MULTIRUN and gpu_count() > 1 and one_gpu:
            with hold_gpu(gpu_count()) as index:  # one job per GPU (hydra/launcher=gpus)
                cfg.device = f"cuda:{index}"
                metrics = run_job(cfg, job_dir)
        else:
            metrics = run_job(cfg, job_dir)
    except Exception as exc:  # a failing job is recorded and the sweep goes on
        metrics = results.write_failure(job_dir, identity(cfg), exc)
        log.error("job failed: %s (%s)", metrics["error"], job_dir)
        if hc.mode != RunMode.MULTIRUN:
            raise SystemExit(f"vlcache: {metrics['error']}") from None
        return metrics
    state = "skipped (already finished)" if metrics.get("skipped") else "done"
    log.info(
        "%s | %s/%s/%s budget=%s: %s=%s realised budget=%.4f -> %s",
        state, cfg.model.name, cfg.dataset.name, cfg.policy.name, cfg.budget,
        metrics.get("metric"), metrics.get("accuracy"), metrics.get("realised_budget") or float("nan"), job_dir,
    )
    return metrics


if __name__ == "__main__":
    main()
