"""Sweeps that lose nothing: kill -9 and resume, per-sample failures, determinism, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI_ENV
from fixture_task import write_fixture_task
from test_run import FIXTURE, ROOT, _cfg, run

from vlcache.eval.job import validate


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_kill_and_resume_rewrites_nothing(tmp_path):
    tasks = write_fixture_task(tmp_path / "tasks", n=4)
    args = ["-m", "policy=full,streamingllm", "budget=0.2,0.6,1.0", f"dataset.task_dir={tasks}", *FIXTURE,
            f"output_root={tmp_path}", "sweep_name=k"]
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env={**os.environ, **CLI_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sweep = tmp_path / "sweeps" / "k"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(sweep.glob("*/metrics.json"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")}
    assert 2 <= len(finished) < 6, "the sweep should have been killed part-way"

    again = run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    done = list(sweep.glob("*/metrics.json"))
    assert len(done) == 6 and all(_metrics(p.parent)["status"] == "ok" for p in done)
    for folder, stamp in finished.items():
        assert (folder / "metrics.json").stat().st_mtime_ns == stamp
    for p in done:
        lines = (p.parent / "samples.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["doc_id"] for line in lines) == [0, 1, 2, 3]


def test_bad_samples_fail_alone(tmp_path):
    tasks = write_fixture_task(tmp_path / "tasks", n=5, corrupt=(1,), long=(3,))
    result = run(f"dataset.task_dir={tasks}", *FIXTURE, f"output_root={tmp_path}", "batch_size=5")
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = (tmp_path / "runs").iterdir()
    metrics = _metrics(job)
    assert metrics["status"] == "ok" and metrics["n_failed_samples"] == 2
    errors = {f["doc_id"]: f["error"] for f in metrics["failed_samples"]}
    assert "undecodable image" in errors[1] and "exceeds the model's 8192 positions" in errors[3]
    rows = {json.loads(line)["doc_id"]: json.loads(line) for line in (job / "samples.jsonl").read_text().splitlines()}
    assert rows[1]["error"] and rows[3]["error"] and rows[0]["error"] is None and rows[0]["prompt_tokens"] > 576


def test_same_seed_same_answers(tmp_path):
    tasks = write_fixture_task(tmp_path / "tasks", n=3)
    answers = []
    for out in ("a", "b"):
        result = run(f"dataset.task_dir={tasks}", *FIXTURE, f"output_root={tmp_path / out}", "policy=random",
                     "budget=0.3", "seed=7")
        assert result.returncode == 0, result.stderr[-3000:]
        (job,) = (tmp_path / out / "runs").iterdir()
        answers.append([json.loads(line)["answer"] for line in (job / "samples.jsonl").read_text().splitlines()])
        answers[-1].append(_metrics(job)["realised_budget"])
    assert answers[0] == answers[1]


def test_unwritable_output_folder_fails_fast(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("model=tiny_random", f"output_root={blocker}/out")
    assert result.returncode != 0
    assert "is not writable" in result.stderr and "set output_root=" in result.stderr


def test_budget_below_one_token_per_layer_clamps_and_warns(caplog):
    from conftest import preset, random_images

    from vlcache.engine.generate import generate
    from vlcache.models.adapter import LlavaAdapter
    from vlcache.policies.policy import build_policy
    from vlcache.zoo.model import build_random_llava

    adapter = LlavaAdapter(*build_random_llava(0), "cpu")
    inputs = adapter.build_inputs(["Why?"], [random_images(1)])
    with caplog.at_level("WARNING"):
        out = generate(adapter, build_policy(preset("streamingllm"), 0.0001), inputs, 2)
    assert out.report.keep_counts.min() >= 1 and out.report.clamped > 0
    assert "raised to the protected count" in caplog.text


@pytest.mark.parametrize("device", ["cuda:7"])
def test_unavailable_device_is_a_clear_error(device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine has cuda devices")
    with pytest.raises(ValueError, match="CUDA is not available; valid here: auto, cpu"):
        validate(_cfg(f"device={device}", "model=tiny_random"))


@pytest.mark.parametrize("name", ["vlcache", "lookm"])
def test_prompt_without_image_fails_for_modality_aware_policies(name, tiny_adapter):
    from conftest import preset

    from vlcache.engine.generate import generate
    from vlcache.policies.policy import build_policy

    inputs = tiny_adapter.build_inputs(["Just text, no picture."], [[]])
    with pytest.raises(ValueError, match=rf"policy '{name}' tells image tokens from text tokens.*no image tokens"):
        generate(tiny_adapter, build_policy(preset(name), 0.5), inputs, 2)
    out = generate(tiny_adapter, build_policy(preset("snapkv"), 0.5), inputs, 2)  # modality-blind: fine
    assert out.image_tokens == [0]


def test_engine_choice_is_checked():
    with pytest.raises(ValueError, match="unknown engine 'turbo'; valid: simple, fast"):
        validate(_cfg("engine=turbo", "model=tiny_random"))
    with pytest.raises(ValueError, match="engine=fast needs a CUDA device"):
        validate(_cfg("engine=fast", "device=cpu", "model=tiny_random"))


def test_a_failing_visual_hook_fails_its_sample_only(tiny_adapter):
    """Any error while loading a sample's images (not only an undecodable one) is recorded for that sample."""
    from types import SimpleNamespace

    from conftest import preset, random_images

    from vlcache.eval.lmms_model import VLCacheLMM
    from vlcache.policies.policy import build_policy

    def visuals(doc):
        if doc["broken"]:
            raise OSError("image file vanished")
        return random_images(1)

    lm = VLCacheLMM(tiny_adapter, build_policy(preset("full"), 1.0), batch_size=2)
    lm.task_dict = {"t": {"test": [{"broken": False}, {"broken": True}]}}
    reqs = [SimpleNamespace(args=("Why?", {"max_new_tokens": 2}, visuals, i, "t", "test")) for i in range(2)]
    answers = lm.generate_until(reqs)
    assert len(answers) == 2 and answers[1] == ""
    assert lm.failures == {("t", 1): "OSError: image file vanished"}
    assert ("t", 0) in lm.samples
