"""One job = one (model, dataset, policy, budget): validate, skip if done, evaluate through lmms-eval, record."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vlcache import results
from vlcache.engine.prefill_attention import check_backend
from vlcache.eval.tasks import check_dataset, sample_subset, task_manager
from vlcache.models.load import check_model, load_model, resolve_device
from vlcache.policies.policy import build_policy

log = logging.getLogger(__name__)

ENGINES = ("simple", "fast")


def identity(cfg: DictConfig) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "policy": cfg.policy.name,
        "budget": cfg.budget,
        "seed": cfg.seed,
    }


def validate(cfg: DictConfig) -> None:
    """Everything that can be checked before a model loads (policies.md §1, issue: bad input)."""
    budget = cfg.budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"budget must be a number in (0, 1] (the fraction of prompt KV entries kept), got {budget!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    device = resolve_device(cfg.device)
    if cfg.engine not in ENGINES:
        raise ValueError(f"unknown engine {cfg.engine!r}; valid: {', '.join(ENGINES)}")
    if cfg.engine == "fast" and device.type != "cuda":
        raise ValueError(
            f"engine=fast needs a CUDA device (device={cfg.device!r} resolves to {device}); use engine=simple"
        )
    check_backend(cfg.get("prefill_attention", "auto"))
    build_policy(OmegaConf.to_container(cfg.policy, resolve=True), float(budget))
    check_model(OmegaConf.to_container(cfg.model, resolve=True))
    check_dataset(OmegaConf.to_container(cfg.dataset, resolve=True))


def run_job(cfg: DictConfig, job_dir: Path) -> dict[str, Any]:
    """Runs the job unless `job_dir` already holds a finished result; returns its metrics."""
    job_dir.mkdir(parents=True, exist_ok=True)
    if results.is_finished(job_dir) and not cfg.force:
        log.info("skipping %s: already finished", job_dir)
        return {**results.read_metrics(job_dir), "skipped": True}
    validate(cfg)
    results.write_config(job_dir, OmegaConf.to_yaml(cfg, resolve=True))
    mirror = None
    if cfg.logger.name == "wandb":
        mirror = results.WandbMirror(
            OmegaConf.to_container(cfg.logger, resolve=True), job_dir, OmegaConf.to_container(cfg, resolve=True),
            group=job_dir.parent.name, name=job_dir.name,
        )
    try:
        key = _budget_free_key(cfg)
        metrics = _reuse_budget_free(key, cfg, job_dir)
        if metrics is None:
            metrics = evaluate(cfg, job_dir)
            _remember_budget_free(key, job_dir, metrics)
    except BaseException:
        if mirror is not None:
            mirror.finish(failed=True)
        raise
    if mirror is not None:
        mirror.log(metrics, results.read_samples(job_dir))
        mirror.log_figures(job_dir)
        mirror.finish()
    return metrics


# Results of budget-free jobs computed in this process, keyed by everything in the config but the budget (and
# the output location): `full` keeps every entry whatever the budget, so a sweep over budgets (Hydra's basic
# launcher runs its jobs one after another in one process) evaluates it once per model and task and writes that
# result again for the other budgets rather than recomputing identical answers (`make sweep`: 24 of 252 jobs).
_BUDGET_FREE: dict[str, tuple[Path, dict[str, Any], list[dict[str, Any]]]] = {}
_OUTPUT_KEYS = ("budget", "force", "logger", "output_root", "sweep_name")


def _budget_free_key(cfg: DictConfig) -> str | None:
    """The reuse key of a job whose result cannot depend on the budget, else None. That is a `keep_all` policy
    (every prompt entry kept) whose decode rule never evicts (`append`): `fixed_point` and `rolling` evict
    during decoding by the budget even when the prompt was kept whole."""
    if not cfg.policy.get("keep_all") or cfg.policy.decode.get("name") != "append":
        return None
    conf = OmegaConf.to_container(cfg, resolve=True)
    return json.dumps({k: v for k, v in conf.items() if k not in _OUTPUT_KEYS}, sort_keys=True, default=str)


def _remember_budget_free(key: str | None, job_dir: Path, metrics: dict[str, Any]) -> None:
    if key is not None and metrics.get("status") == "ok":
        _BUDGET_FREE[key] = (job_dir, metrics, results.read_samples(job_dir))


def _reuse_budget_free(key: str | None, cfg: DictConfig, job_dir: Path) -> dict[str, Any] | None:
    """Writes the result of an identical budget-free job run earlier in this process into `job_dir` (its own
    identity, `reused_from` naming the job that computed it, whose timings it keeps); None if there is none."""
    if key is None or key not in _BUDGET_FREE:
        return None
    source, metrics, samples = _BUDGET_FREE[key]
    log.info("%s ignores the budget: reusing the result of %s", cfg.policy.name, source)
    results.write_samples(job_dir, samples)
    metrics = {**metrics, **identity(cfg), "reused_from": str(source)}
    results.write_metrics(job_dir, metrics)
    return metrics


# conf/policy/full.yaml as Hydra composes it (tests/test_reference.py keeps the two equal): the reference of
# `reference_metrics`, built inside a job whatever its own policy
FULL_POLICY = {
    "name": "full", "granularity": "kv_head", "sinks": 0, "recent": 0, "keep_all": True,
    "postvision_fallback": False, "scorer": {"name": "recency"}, "allocator": {"name": "uniform"},
    "reducer": {"name": "evict"}, "decode": {"name": "append"},
}


def evaluate(cfg: DictConfig, job_dir: Path) -> dict[str, Any]:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import get_task_dict

    from vlcache.eval.lmms_model import VLCacheLMM
    from vlcache.eval.safe_images import make_image_decoding_safe

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1" if cfg.dataset.source == "embedded" else "0")
    started = time.time()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    adapter = load_model(OmegaConf.to_container(cfg.model, resolve=True), device, cfg.seed)
    adapter.prefill_attention = cfg.get("prefill_attention", "auto")  # the adapter is shared by a sweep's jobs
    policy = build_policy(OmegaConf.to_container(cfg.policy, resolve=True), float(cfg.budget))
    full = None
    if cfg.get("reference_metrics"):  # Elastic Cache's protocol: the full cache's answer is the reference
        full = build_policy(json.loads(json.dumps(FULL_POLICY)), 1.0)
    lm = VLCacheLMM(adapter, policy, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                    engine=cfg.engine, reference_policy=full, max_context_len=cfg.get("max_context_len"),
                    allow_past_positions=cfg.get("allow_past_positions", False))
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    limit = cfg.limit if cfg.limit is not None else dataset.get("limit")
    manager = task_manager(dataset)
    tasks = get_task_dict([dataset["task"]], manager)
    for task_obj in tasks.values():
        sample_subset(task_obj, limit, dataset.get("seed"))
        make_image_decoding_safe(task_obj)
    out = simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=manager,  # or simple_evaluate indexes every lmms-eval task again
        limit=limit,
        batch_size=cfg.batch_size,
        log_samples=True,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        verbosity="WARNING",
    )
    task = dataset["task"]
    scores = {k.split(",")[0]: v for k, v in out["results"][task].items() if "_stderr" not in k and k != "alias"}
    samples = [_sample_row(s, lm.samples.get((task, s["doc_id"])), lm.failures.get((task, s["doc_id"])))
               for s in out["samples"][task]]
    results.write_samples(job_dir, samples)
    metrics = {
        **identity(cfg),
        "status": "ok",
        "metrics": scores,
        "accuracy": scores.get(dataset["metric"]),
        "metric": dataset["metric"],
        **_engine_metrics(lm, time.time() - started),
        **_reference_metrics(lm),
        "n_failed_samples": len(lm.failures),
        "failed_samples": [{"doc_id": k[1], "error": v} for k, v in lm.failures.items()],
        "model_weights": adapter.weights,
        "device": _device_name(device),
        "versions": {p: _version(p) for p in ("torch", "transformers", "lmms_eval", "vlcache")},
        "python": platform.python_version(),
    }
    results.write_metrics(job_dir, metrics)
    return metrics


def _version(package: str) -> str:
    """The installed version; a source checkout run without `pip install` (PYTHONPATH) has no metadata."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed (source tree)"


def _sample_row(sample: dict, record, error: str | None) -> dict[str, Any]:
    resp = sample.get("filtered_resps") or sample.get("resps") or [""]
    while isinstance(resp, list) and resp:
        resp = resp[0]
    row = {
        "id": sample.get("doc", {}).get("id", sample["doc_id"]) if isinstance(sample.get("doc"), dict) else None,
        "doc_id": sample["doc_id"],
        "answer": resp,
        "reference": sample.get("target"),
    }
    metric_keys = [k for k in sample if k not in ("doc", "doc_id", "target", "arguments", "resps",
                                                  "filtered_resps", "doc_hash", "prompt_hash", "target_hash",
                                                  "filter", "metrics", "input", "token_counts")]
    row["scores"] = {k: sample[k] for k in metric_keys}
    if record is not None:
        row.update(vars(record))
    row["error"] = error
    return row


def _reference_metrics(lm) -> dict[str, Any]:
    """Means over samples of the per-sample scores against the full cache's answer (`reference_metrics`)."""
    if lm.reference_policy is None:
        return {}
    records = list(lm.samples.values())

    def mean(key: str) -> float | None:
        values = [getattr(r, key) for r in records if getattr(r, key) is not None]
        return sum(values) / len(values) if values else None

    return {"reference_metrics": {"ppl_vs_full": mean("ppl_vs_full"), "rouge_l_vs_full": mean("rouge_l_vs_full")}}


def _engine_metrics(lm, wall_s: float) -> dict[str, Any]:
    """Aggregates the engine's per-batch numbers: means per batch for times, sums for bytes."""
    outs = [b.output for b in lm.batches]
    n = sum(b.size for b in lm.batches)
    if not outs:
        return {"n_samples": 0, "wall_s": wall_s}
    gen_tokens = sum(sum(len(t) for t in o.tokens) for o in outs)
    total_ms = sum(o.e2e_ms for o in outs)
    # kept entries per layer, and the prompt entries one layer holds (per KV head), over all batches
    layer_kept = sum(o.report.keep_counts.double().sum((1, 2)) for o in outs)
    layer_full = sum(float(o.report.prompt_lengths.sum()) * o.report.keep_counts.shape[2] for o in outs)
    sparsity = [o.report.sparsity for o in outs if o.report.sparsity is not None]
    peaks = [o.peak_gpu_bytes for o in outs if o.peak_gpu_bytes is not None]
    return {
        "n_samples": n,
        "realised_budget": float(layer_kept.sum()) / (layer_full * len(layer_kept)),
        "layer_budgets": (layer_kept / layer_full).tolist(),
        "layer_sparsity": torch.cat(sparsity, 1).mean(1).tolist() if sparsity else None,
        "clamped": sum(o.report.clamped for o in outs),
        "prefill_ms": sum(o.prefill_ms for o in outs) / len(outs),
        "compress_ms": sum(o.compress_ms for o in outs) / len(outs),
        "decode_ms_per_token": sum(o.decode_ms for o in outs) / max(sum(o.new_tokens - 1 for o in outs), 1),
        "e2e_ms": total_ms / len(outs),
        "tokens_per_s": gen_tokens / (total_ms / 1e3) if total_ms else None,
        "samples_per_s": n / (total_ms / 1e3) if total_ms else None,
        "kv_bytes_full": sum(o.kv_bytes_full for o in outs),
        "kv_bytes_kept": sum(o.kv_bytes_kept for o in outs),
        "kv_bytes_allocated": sum(o.kv_bytes_allocated for o in outs),
        "peak_gpu_bytes": max(peaks) if peaks else None,
        "batches": len(outs),
        "wall_s": wall_s,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
