"""run.py end to end: result files, sweeps named by overrides, resume, failures, bad input."""

import json
from pathlib import Path

import pytest
from conftest import run_cli as run
from fixture_task import write_fixture_task
from hydra import compose, initialize_config_dir

from vlcache.eval.job import validate
from vlcache.models.hub import MissingResource

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ["dataset.task=fixture_qa", "dataset.name=fixture_qa", "dataset.metric=exact_match",
           "model=tiny_random"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_fixture_task(tmp_path_factory.mktemp("tasks"), n=5)


def test_sweep_writes_results_and_resumes(tmp_path, tasks):
    args = ["-m", "policy=full,streamingllm", "budget=0.1,1.0", f"dataset.task_dir={tasks}", *FIXTURE,
            f"output_root={tmp_path}", "sweep_name=s"]
    first = run(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweeps" / "s").iterdir() if p.is_dir())
    assert len(jobs) == 4
    assert all("budget=" in p.name and "policy=" in p.name for p in jobs)
    answers = {}
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["n_samples"] == 5
        for key in ("prefill_ms", "decode_ms_per_token", "e2e_ms", "tokens_per_s", "kv_bytes_full",
                    "kv_bytes_kept", "realised_budget", "accuracy", "versions", "device"):
            assert key in metrics
        rows = [json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 5 and {"answer", "reference", "scores", "prompt_tokens", "kept_tokens"} <= set(rows[0])
        assert (job / "config.yaml").exists()
        answers[(metrics["policy"], metrics["budget"])] = [r["answer"] for r in rows]
        expected = 1.0 if metrics["policy"] == "full" or metrics["budget"] == 1.0 else 0.1
        assert abs(metrics["realised_budget"] - expected) < 0.02
    assert answers[("streamingllm", 1.0)] == answers[("full", 1.0)]
    # `full` ignores the budget: the sweep computes it once and writes that result for the other budget
    full = [json.loads((job / "metrics.json").read_text()) for job in jobs if "policy=full" in job.name]
    reused = [m.get("reused_from") for m in full]
    assert sorted(map(bool, reused)) == [False, True]
    assert answers[("full", 0.1)] == answers[("full", 1.0)]
    stamps = {job: (job / "metrics.json").stat().st_mtime_ns for job in jobs}

    again = run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipped (already finished)") == 4
    assert {job: (job / "metrics.json").stat().st_mtime_ns for job in jobs} == stamps


def test_failed_job_is_recorded_and_sweep_goes_on(tmp_path, tasks):
    args = ["-m", "budget=0.5,7", f"dataset.task_dir={tasks}", *FIXTURE, f"output_root={tmp_path}",
            "sweep_name=f", "limit=2"]
    result = run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    (good_dir,) = (tmp_path / "sweeps/f").glob("budget=0.5,*")
    (bad_dir,) = (tmp_path / "sweeps/f").glob("budget=7,*")
    good = json.loads((good_dir / "metrics.json").read_text())
    bad = json.loads((bad_dir / "metrics.json").read_text())
    assert good["status"] == "ok"
    assert bad["status"] == "failed" and "budget must be a number in (0, 1]" in bad["error"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, "'abc'"])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match=r"budget must be a number in \(0, 1\]"):
        validate(_cfg(f"budget={budget}", "model=tiny_random"))


def test_unknown_names_list_the_valid_ones():
    from hydra.errors import MissingConfigException

    for group in ("policy", "model", "dataset"):
        with pytest.raises(MissingConfigException, match=r"Available options") as err:
            _cfg(f"{group}=nosuch")
        assert "nosuch" in str(err.value)
    with pytest.raises(ValueError, match=r"unknown scorer 'nosuch'; valid: .*recency"):
        validate(_cfg("policy.scorer.name=nosuch", "model=tiny_random"))


def test_unknown_name_on_the_command_line_fails_fast():
    result = run("policy=nosuch")
    assert result.returncode != 0
    assert "nosuch" in result.stderr and "streamingllm" in result.stderr


def test_real_model_and_dataset_offline_fail_fast_with_the_fix():
    with pytest.raises(MissingResource, match=r"llava-hf/llava-1.5-7b-hf.*model.path="):
        validate(_cfg("model=llava15_7b"))
    with pytest.raises(MissingResource, match=r"lmms-lab-encoder/DocVQA.*dataset.path="):
        validate(_cfg("dataset=docvqa_val", "model=tiny_random"))
    with pytest.raises(MissingResource, match=r"does not exist"):
        validate(_cfg("model=llava15_7b", "model.path=/nonexistent/llava"))
    # the brief's main command names `dataset=docvqa`: DocVQA validation, failing the same way offline
    assert _cfg("dataset=docvqa").dataset.task == "docvqa_val"
    with pytest.raises(MissingResource, match=r"lmms-lab-encoder/DocVQA.*dataset.path="):
        validate(_cfg("dataset=docvqa", "policy=vlcache", "budget=0.1"))


def test_missing_embedded_task_names_the_valid_ones(tasks):
    with pytest.raises(MissingResource, match=r"'nosuch' not found .* valid: fixture_qa"):
        validate(_cfg("dataset.task=nosuch", f"dataset.task_dir={tasks}", "model=tiny_random"))


def test_wandb_logger_mirrors_the_job_offline(tmp_path, tasks):
    env_args = [f"dataset.task_dir={tasks}", *FIXTURE, f"output_root={tmp_path}", "logger=wandb",
                "logger.mode=offline", "limit=2", "policy=streamingllm", "budget=0.5"]
    result = run(*env_args)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = (tmp_path / "runs").iterdir()
    runs = list((job / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert json.loads((job / "metrics.json").read_text())["status"] == "ok"
