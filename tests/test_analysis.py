"""analysis/: loading results (failed and incomplete jobs visible), the table, every figure, the sweep progress
callback, the W&B pieces, and every notebook executed on a results set generated here."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from fixture_task import write_fixture_task
from omegaconf import OmegaConf
from PIL import Image

matplotlib.use("Agg")

import analysis  # noqa: E402
from analysis.notebooks import execute_notebook, notebooks  # noqa: E402
from vlcache.progress import SweepProgress, count_jobs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYERS = 4


def _job(root: Path, dataset: str, policy: str, budget: float, status: str = "ok", acc: float = 0.5,
         sparsity: bool = False) -> Path:
    folder = root / f"budget={budget},dataset={dataset},policy={policy}"
    folder.mkdir(parents=True)
    config = {"model": {"name": "tiny", "family": "llava"}, "dataset": {"name": dataset, "metric": "anls"},
              "policy": {"name": policy, "scorer": {"name": "window"}}, "budget": budget, "seed": 0,
              "device": "auto", "batch_size": 2}
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    if status == "incomplete":
        return folder
    metrics = {"model": "tiny", "dataset": dataset, "policy": policy, "budget": budget, "seed": 0,
               "status": status, "device": "cpu (test)"}
    if status == "ok":
        beta = [budget * f for f in np.linspace(1.5, 0.5, LAYERS)] if sparsity else [budget] * LAYERS
        metrics.update(metrics={"anls": acc}, accuracy=acc, metric="anls", realised_budget=budget,
                       layer_budgets=beta, layer_sparsity=list(np.linspace(0.5, 0.9, LAYERS)) if sparsity else None,
                       n_samples=2, versions={"torch": "2.x"})
        rows = [{"id": f"s{i}", "answer": "a", "reference": "a", "scores": {"anls": acc}, "prompt_tokens": 600}
                for i in range(2)]
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        metrics["error"] = "RuntimeError: boom"
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture(scope="module")
def fake_results(tmp_path_factory) -> Path:
    """Two datasets × (full, streamingllm, vlcache) × budgets 0.1 / 0.5, plus one failed and one incomplete job."""
    root = tmp_path_factory.mktemp("fake") / "sweeps" / "s"
    for d, dataset in enumerate(["ds_a", "ds_b"]):
        _job(root, dataset, "full", 1.0, acc=0.8 + 0.1 * d)
        for budget in (0.1, 0.5):
            _job(root, dataset, "streamingllm", budget, acc=budget + 0.1 * d)
            if not (dataset == "ds_b" and budget == 0.1):
                _job(root, dataset, "vlcache", budget, acc=budget + 0.2 + 0.1 * d, sparsity=True)
    _job(root, "ds_b", "vlcache", 0.1, status="failed")
    _job(root, "ds_a", "snapkv", 0.1, status="incomplete")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root.parent.parent


def test_load_jobs_shows_failed_and_incomplete_jobs(fake_results):
    jobs = analysis.load_jobs(fake_results)
    assert len(jobs) == 11
    assert jobs["status"].value_counts().to_dict() == {"ok": 9, "failed": 1, "incomplete": 1}
    failed = jobs[jobs["status"] == "failed"].iloc[0]
    assert failed["error"] == "RuntimeError: boom" and failed["policy"] == "vlcache"
    incomplete = jobs[jobs["status"] == "incomplete"].iloc[0]  # identity taken from its config.yaml
    assert (incomplete["policy"], incomplete["dataset"], incomplete["budget"]) == ("snapkv", "ds_a", 0.1)
    assert {"policy.scorer.name", "model.family", "metrics.anls", "versions.torch", "batch_size"} <= set(jobs)
    assert set(jobs["device"].dropna()) == {"cpu (test)"} and set(jobs["config.device"]) == {"auto"}
    assert (jobs["sweep"] == "s").all()
    one = analysis.load_jobs(jobs["path"].iloc[0])  # a job folder on its own
    assert len(one) == 1


def test_load_samples_one_row_per_sample(fake_results):
    samples = analysis.load_samples(fake_results)
    assert len(samples) == 9 * 2
    assert {"job", "policy", "budget", "dataset", "answer", "scores.anls", "prompt_tokens"} <= set(samples)


def test_load_wandb_reads_runs_like_jobs():
    run = SimpleNamespace(group="sweep1", name="budget=0.1,policy=h2o", path=["me", "vlcache", "abc"],
                          state="finished", config={"policy": {"name": "h2o"}, "budget": 0.1, "device": "auto"},
                          summary={"status": "ok", "accuracy": 0.4, "dataset": "ds", "device": "H200", "_step": 1})
    crashed = SimpleNamespace(group="sweep1", name="x", path="me/vlcache/def", state="crashed",
                              config={"policy": {"name": "vlcache"}, "budget": 0.5}, summary={})
    api = SimpleNamespace(runs=lambda project, filters: [run, crashed])
    frame = analysis.load_wandb("me/vlcache", api=api)
    assert list(frame["status"]) == ["ok", "failed"]
    assert frame.loc[0, "policy"] == "h2o" and frame.loc[0, "accuracy"] == 0.4
    assert frame.loc[0, "device"] == "H200" and frame.loc[0, "config.device"] == "auto"
    assert frame.loc[1, "policy"] == "vlcache" and frame.loc[1, "sweep"] == "sweep1"


def test_main_table_values_average_and_formats(fake_results):
    table = analysis.main_table(analysis.load_jobs(fake_results))
    assert list(table.columns) == ["ds_a", "ds_b", "Average"]
    assert table.index[0] == ("full cache", "full")
    assert table.loc[("full cache", "full"), "ds_b"] == pytest.approx(90.0)
    assert table.loc[("10%", "streamingllm"), "Average"] == pytest.approx((10 + 20) / 2)
    assert np.isnan(table.loc[("10%", "vlcache"), "ds_b"])  # the failed job: missing, not dropped
    assert np.isnan(table.loc[("10%", "vlcache"), "Average"])
    assert ("10%", "snapkv") in table.index  # the incomplete job's row is there, empty
    md = analysis.to_markdown(table)
    assert "| 10% | StreamingLLM | 10.0 | 20.0 | 15.0 |" in md and "**70.0**" in md and "—" in md
    tex = analysis.to_latex(table, caption="Main table")
    assert r"\toprule" in tex and r"\textbf{70.0}" in tex and r"10\%" in tex and "--" in tex


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5000
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 150


def _check_labelled(fig, legend: bool = True) -> None:
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        if ax.xaxis.get_visible():
            assert ax.get_xlabel() and ax.get_title(), ax
        else:  # a twin axis: it shares the x axis and the title, and labels its own y axis
            assert ax.get_ylabel(), ax
    assert any(ax.get_ylabel() for ax in axes)
    if legend:
        assert fig.legends or any(ax.get_legend() for ax in axes)


def test_accuracy_vs_budget(fake_results, tmp_path):
    jobs = analysis.load_jobs(fake_results)
    fig = analysis.accuracy_vs_budget(jobs, path=tmp_path / "acc.png")
    _check_png(tmp_path / "acc.png")
    _check_labelled(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "%" in ax.get_ylabel() and "budget" in ax.get_xlabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0].startswith("Full cache") and "StreamingLLM" in labels and "failed / incomplete job" in labels


def test_allocation_figures(fake_results, tmp_path):
    jobs = analysis.load_jobs(fake_results)
    fig = analysis.allocation_figure(jobs, budget=0.5, path=tmp_path / "alloc.png")
    _check_png(tmp_path / "alloc.png")
    _check_labelled(fig)
    left, right = fig.axes
    assert len(left.lines) == 2 and "γ_l" in left.get_ylabel()
    assert {t.get_text() for t in right.get_legend().get_texts()} >= {"StreamingLLM", "VL-Cache", "nominal 50%"}
    job = jobs[(jobs["policy"] == "vlcache") & (jobs["status"] == "ok")].iloc[0].to_dict()
    fig = analysis.job_allocation_figure(job, path=tmp_path / "job.png")
    _check_png(tmp_path / "job.png")
    _check_labelled(fig)


def test_table_figure(fake_results, tmp_path):
    fig = analysis.table_figure(analysis.main_table(analysis.load_jobs(fake_results)), path=tmp_path / "t.png")
    _check_png(tmp_path / "t.png")
    assert fig.axes[0].get_title()


def test_speed_table_and_figure_from_the_example_schema(tmp_path):
    bench = analysis.load_bench()
    assert bench.attrs["example"] and "not measured" in bench.attrs["note"]
    table = analysis.speed_table(bench, baseline="hf_generate")
    point = table.loc[(1, 2048)]
    hf = bench[(bench["batch"] == 1) & (bench["prompt_len"] == 2048) & (bench["baseline"] == "hf_generate")]
    vl = bench[(bench["batch"] == 1) & (bench["prompt_len"] == 2048) & (bench["policy"] == "vlcache")]
    assert point.loc["VL-Cache @ 10%", "decode_speedup"] == pytest.approx(
        hf["decode_ms_per_token"].iloc[0] / vl["decode_ms_per_token"].iloc[0])
    assert point.loc["HF generate, full cache", "e2e_speedup"] == pytest.approx(1.0)
    assert point.loc["VL-Cache @ 10%", "kv_fraction"] == pytest.approx(0.1, rel=0.05)
    fig = analysis.speed_figure(bench, path=tmp_path / "speed.png")
    _check_png(tmp_path / "speed.png")
    _check_labelled(fig)
    assert "NOT MEASURED" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="schema"):
        analysis.load_bench([{"batch": 1}])


def test_kept_patches_figure_from_positions(tmp_path):
    start, side = 5, 24
    kept = [np.array([[start + 0, start + 1, 2, -1], [start + 1, start + 575, -1, -1]]) for _ in range(LAYERS)]
    frac = analysis.patches.patch_fractions(kept[0], (start, start + side * side))
    assert frac.shape == (side, side) and frac[0, 0] == 0.5 and frac[0, 1] == 1.0 and frac[-1, -1] == 0.5
    assert frac.sum() == 2.0
    image = Image.fromarray(np.full((300, 400, 3), 200, np.uint8))
    fig = analysis.kept_patches_figure(image, (start, start + 576), kept, layers=[0, 3], path=tmp_path / "kp.png")
    _check_png(tmp_path / "kp.png")
    _check_labelled(fig, legend=False)
    assert any(ax.get_label() == "<colorbar>" and "KV heads" in ax.get_ylabel() for ax in fig.axes)


def test_kept_patches_for_sample_runs_the_engine(tiny_adapter, tmp_path):
    from conftest import preset, random_images

    from vlcache.policies.policy import build_policy

    policy = build_policy(preset("streamingllm"), 0.25)
    kept = analysis.kept_patches_for_sample(tiny_adapter, policy, random_images(1, seed=0)[0], "What is it?",
                                            max_new_tokens=2)
    (start, end), = kept.spans
    assert end - start == 576 and len(kept.kept_positions) == tiny_adapter.num_layers
    assert kept.kept_positions[0].shape[0] == tiny_adapter.num_kv_heads
    frac = analysis.patches.patch_fractions(kept.kept_positions[-1], kept.spans[0])
    assert 0 < frac.mean() < 0.5  # a quarter of the prompt is kept: some patches, far from all
    kept.figure(path=tmp_path / "kp.png")
    _check_png(tmp_path / "kp.png")


def _hydra_cfg(task: list[str], params: dict | None = None):
    return OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper"
                                                                ".BasicSweeper", "params": params},
                                       "overrides": {"task": task}}})


def test_progress_counts_done_failed_skipped():
    assert count_jobs(_hydra_cfg(["policy=a,b", "budget=0.1,0.2,0.3", "seed=1"])) == 6
    assert count_jobs(_hydra_cfg(["budget=0.5"], {"policy": "a,b,c", "budget": "0.1,0.2"})) == 3
    stream = io.StringIO()
    progress = SweepProgress(stream=stream)
    progress.on_multirun_start(_hydra_cfg(["policy=a,b", "budget=0.1,0.2"]))
    returns = [{"status": "ok", "n_samples": 8}, {"status": "ok", "n_samples": 8, "skipped": True},
               {"status": "failed"}]
    for value in returns:
        progress.on_job_start(None)
        progress.on_job_end(None, SimpleNamespace(return_value=value))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[vlcache] jobs 1/4 done (0 failed, 0 skipped) · ")
    assert lines[-1].startswith("[vlcache] jobs 3/4 done (1 failed, 1 skipped) · ")
    assert "samples/s" in lines[-1] and "ETA" in lines[-1]


@pytest.fixture(scope="module")
def sweep_results(tmp_path_factory):
    """A real sweep: tiny_random on the fixture task, 2 policies × (a budget, and one that fails)."""
    tmp = tmp_path_factory.mktemp("sweep")
    tasks = write_fixture_task(tmp / "tasks", n=2)
    args = ["-m", "model=tiny_random", "policy=full,streamingllm", "budget=0.5,7", f"dataset.task_dir={tasks}",
            "dataset.task=fixture_qa", "dataset.name=fixture_qa", "dataset.metric=exact_match", "limit=2",
            "max_new_tokens=2", f"output_root={tmp / 'out'}", "sweep_name=nb"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out" / "sweeps" / "nb", result.stderr


def test_sweep_prints_progress(sweep_results):
    _, stderr = sweep_results
    lines = [line for line in stderr.splitlines() if line.startswith("[vlcache] jobs")]
    assert len(lines) == 4 and lines[-1].startswith("[vlcache] jobs 4/4 done (2 failed, 0 skipped)")


def test_notebooks_execute_and_write_their_figures(sweep_results, tmp_path):
    results, _ = sweep_results
    jobs = analysis.load_jobs(results)
    assert jobs["status"].value_counts().to_dict() == {"ok": 2, "failed": 2}
    found = notebooks()
    assert {nb.stem for nb in found} == {"accuracy_vs_budget", "main_table", "speed", "allocation", "kept_patches"}
    figures = tmp_path / "figures"
    for nb in found:
        execute_notebook(nb, env={"VLCACHE_RESULTS": str(results), "VLCACHE_FIGURES": str(figures)})
        _check_png(figures / f"{nb.stem}.png")
    assert (figures / "main_table.tex").read_text().startswith(r"\begin{table}")


def test_wandb_mirror_logs_the_job_figure(fake_results, tmp_path):
    pytest.importorskip("wandb")
    from vlcache.results import WandbMirror

    source = analysis.load_jobs(fake_results).query("policy == 'vlcache' and status == 'ok'")["path"].iloc[0]
    job = tmp_path / "job"
    job.mkdir()
    (job / "metrics.json").write_text(Path(source, "metrics.json").read_text())
    mirror = WandbMirror({"mode": "offline", "project": "test"}, job, {"budget": 0.1}, group="s", name="job")
    mirror.log_figures(job)
    mirror.finish()
    images = list((job / "wandb").glob("offline-run-*/files/media/images/figures/layer_allocation*.png"))
    assert len(images) == 1 and images[0].stat().st_size > 1000


def test_frames_are_pandas():
    assert isinstance(analysis.load_jobs([]), pd.DataFrame)


def test_notebooks_run_on_the_shipped_embedded_results(tmp_path):
    """The notebooks' default: the results set `make figures` generates from the embedded suite."""
    results = Path(__file__).resolve().parent.parent / "results" / "embedded"
    jobs = analysis.load_jobs(results)
    assert len(jobs) > 0 and (jobs["status"] == "ok").all()
    assert set(jobs["dataset"]) == {"synth_docvqa", "synth_caption", "synth_count", "synth_multi"}
    for nb in notebooks():
        execute_notebook(nb, env={"VLCACHE_RESULTS": str(results), "VLCACHE_FIGURES": str(tmp_path)})
        _check_png(tmp_path / f"{nb.stem}.png")


def test_speed_reads_the_decode_benchmark_json():
    """experiments/bench_decode.py's rows (`path`, a boolean `baseline`) map onto the two baselines."""
    from analysis.speed import load_bench, speed_table

    common = {"batch": 1, "prompt_len": 2048, "prefill_ms": 50.0, "kv_bytes": 2**28, "device": "GPU"}
    rows = [
        {**common, "path": "transformers", "policy": "full", "budget": 1.0, "baseline": True,
         "decode_ms_per_token": 40.0, "e2e_ms": 4000.0},
        {**common, "path": "fast", "policy": "full", "budget": 1.0, "baseline": False,
         "decode_ms_per_token": 8.0, "e2e_ms": 800.0},
        {**common, "path": "fast", "policy": "vlcache", "budget": 0.1, "baseline": False,
         "decode_ms_per_token": 5.0, "e2e_ms": 500.0, "kv_bytes": 2**25},
    ]
    table = speed_table(load_bench({"rows": rows})).reset_index()
    row = table[table["policy"] == "vlcache"].iloc[0]
    assert row["decode_speedup"] == pytest.approx(8.0) and row["e2e_speedup"] == pytest.approx(8.0)
    assert row["kv_fraction"] == pytest.approx(1 / 8)
