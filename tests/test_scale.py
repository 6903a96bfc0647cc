"""The multi-GPU tooling that runs on the CPU: comparing two runs of a sweep, and a `device_map` job."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import run_cli
from fixture_task import write_fixture_task

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("compare_sweeps", ROOT / "experiments" / "compare_sweeps.py")
compare_sweeps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_sweeps)


def write_job(sweep: Path, name: str, answers: list[str], anls: float, status: str = "ok") -> None:
    job = sweep / name
    job.mkdir(parents=True)
    metrics = {"status": status, "metrics": {"anls": anls}, "realised_budget": 0.2, "device": "NVIDIA H200",
               "samples_per_s": 12.5}
    (job / "metrics.json").write_text(json.dumps(metrics))
    (job / "samples.jsonl").write_text("".join(json.dumps({"answer": a}) + "\n" for a in answers))


def test_compare_sweeps_finds_every_kind_of_difference(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_job(a, "budget=0.2,policy=h2o", ["x", "y"], 0.5)
    write_job(b, "budget=0.2,model.device_map=auto,policy=h2o", ["x", "y"], 0.5)
    write_job(a, "budget=0.2,policy=snapkv", ["x", "y"], 0.5)
    write_job(b, "budget=0.2,model.device_map=auto,policy=snapkv", ["x", "z"], 0.25)
    write_job(a, "budget=0.1,policy=h2o", ["x"], 0.5)
    write_job(b, "budget=0.1,model.device_map=auto,policy=h2o", ["x"], 0.5, status="failed")

    ignore = {"model.device_map"}
    problems = compare_sweeps.compare(compare_sweeps.read(a, ignore), compare_sweeps.read(b, ignore))
    assert len(problems) == 3
    assert any("snapkv: metrics" in p for p in problems)
    assert any("snapkv: 1 of 2 answers differ" in p for p in problems)
    assert any("budget=0.1,policy=h2o: status ok / failed" in p for p in problems)
    # without --ignore, no job name matches: each is reported as missing on the other side
    assert len(compare_sweeps.compare(compare_sweeps.read(a), compare_sweeps.read(b))) == 6
    only = {"budget=0.2"}
    assert sorted(compare_sweeps.read(a, ignore, only)) == ["budget=0.2,policy=h2o", "budget=0.2,policy=snapkv"]


def test_device_map_auto_job_matches_the_one_device_job(tmp_path):
    """`model.device_map=auto` loads the embedded checkpoint through accelerate's placement (every layer on the
    CPU here; split over GPUs on a multi-GPU machine, see experiments/scale_check.sh) and answers as before."""
    pytest.importorskip("accelerate")
    tasks = write_fixture_task(tmp_path / "tasks", n=4)
    common = ["policy=snapkv", "budget=0.5", f"dataset.task_dir={tasks}", "dataset.task=fixture_qa",
              "dataset.name=fixture_qa", "dataset.metric=exact_match", f"output_root={tmp_path}"]
    answers = []
    for extra in ([], ["model.device_map=auto"]):
        done = run_cli(*common, *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        job = tmp_path / "runs" / ",".join(sorted(
            [o for o in common if not o.startswith(("output_root", "dataset.task_dir"))] + extra))
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["model_weights"].startswith("checkpoint")
        answers.append([json.loads(line)["answer"] for line in (job / "samples.jsonl").read_text().splitlines()])
    assert len(answers[0]) == 4 and answers[0] == answers[1]
