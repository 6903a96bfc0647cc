"""Regenerates the embedded results set and every figure: `make figures`.

1. Runs a small sweep on CPU (the embedded model on each embedded task that has a dataset config, a few
   policies and budgets, a few samples per job) into a temporary folder, and replaces `results/embedded`
   with it only when the sweep finished (a failed job is kept and shown; a crashed sweep keeps the old set).
2. Executes every notebook in notebooks/ top to bottom against it (nbclient, this interpreter as kernel) and
   checks that each wrote its PNG into `figures/`.

    python scripts/make_figures.py                      # both steps
    python scripts/make_figures.py --skip-sweep          # notebooks only, on the existing results
    python scripts/make_figures.py --policies full,vlcache --budgets 0.1 --limit 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.notebooks import execute_notebook, notebooks  # noqa: E402  (after the path setup)

# Policies in the order their figures show them; those without a config in conf/policy are left out.
POLICIES = ["full", "streamingllm", "snapkv", "vlcache"]  # H2O scores every row: the slowest on CPU
BUDGETS = [0.05, 0.1, 0.25]
# The PNG each notebook must write (a notebook not listed must write <its name>.png).
EXPECTED = {"main_table": "main_table.png"}


def embedded_datasets() -> list[str]:
    """Dataset configs of the embedded tasks whose data ships in the package (synth_docvqa, synth_caption, ...): not
    the MileBench configs, local tasks too, whose data a user provides (`path_requires`)."""
    import yaml

    from vlcache.eval.tasks import embedded_task_names

    tasks = set(embedded_task_names())
    names = []
    for path in sorted((ROOT / "conf" / "dataset").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if cfg.get("source") == "embedded" and cfg.get("task") in tasks and not cfg.get("path_requires"):
            names.append(path.stem)
    return names


def available(names: list[str], group: str) -> list[str]:
    return [n for n in names if (ROOT / "conf" / group / f"{n}.yaml").exists()]


def run_sweep(overrides: list[str], log_path: Path) -> None:
    """One `run.py -m` sweep; its progress lines go to the terminal, everything else to `log_path`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "run.py", "-m", *overrides]
    print("+", " ".join(cmd), flush=True)
    with log_path.open("a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[vlcache]"):
                print("  " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"the sweep failed (exit {proc.returncode}); its output is in {log_path}")


def make_results(results: Path, model: str, datasets: list[str], policies: list[str], budgets: list[float],
                 limit: int) -> None:
    with tempfile.TemporaryDirectory(prefix="vlcache-figures-") as tmp:
        common = [f"model={model}", f"dataset={','.join(datasets)}", f"limit={limit}", f"output_root={tmp}",
                  "sweep_name=embedded", "device=cpu"]
        log = Path(tmp) / "sweep.log"
        if "full" in policies:  # the full cache keeps everything: one job per dataset, not one per budget
            run_sweep([*common, "policy=full", "budget=1.0"], log)
        compressing = [p for p in policies if p != "full"]
        if compressing:
            sweep = [f"policy={','.join(compressing)}", f"budget={','.join(map(str, budgets))}"]
            run_sweep([*common, *sweep], log)
        sweep = Path(tmp) / "sweeps" / "embedded"
        for junk in sweep.rglob("run.log"):  # lmms-eval's chatter: not worth keeping in the repository
            junk.unlink()
        if results.exists():
            shutil.rmtree(results)
        results.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(sweep, results)


def run_notebooks(results: Path, figures: Path) -> None:
    figures.mkdir(parents=True, exist_ok=True)
    env = {"VLCACHE_RESULTS": str(results), "VLCACHE_FIGURES": str(figures)}
    for nb in notebooks():
        expected = figures / EXPECTED.get(nb.stem, f"{nb.stem}.png")
        expected.unlink(missing_ok=True)
        started = time.perf_counter()
        execute_notebook(nb, env=env)
        if not expected.is_file() or expected.stat().st_size == 0:
            raise SystemExit(f"{nb.name} ran but did not write {expected}")
        print(f"  {nb.name}: {expected.relative_to(ROOT) if expected.is_relative_to(ROOT) else expected} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "embedded")
    parser.add_argument("--figures", type=Path, default=ROOT / "figures")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--datasets", help="comma-separated dataset configs (default: every embedded task)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--limit", type=int, default=8, help="samples per job")
    parser.add_argument("--skip-sweep", action="store_true", help="only execute the notebooks")
    args = parser.parse_args()

    results, figures = args.results.resolve(), args.figures.resolve()
    if not args.skip_sweep:
        datasets = args.datasets.split(",") if args.datasets else embedded_datasets()
        policies = available(args.policies.split(","), "policy")
        if not datasets or not policies:
            raise SystemExit(f"nothing to run: datasets={datasets}, policies={policies}")
        print(f"[figures] sweep: model={args.model} datasets={datasets} policies={policies} "
              f"budgets={args.budgets} limit={args.limit} -> {results}", flush=True)
        make_results(results, args.model, datasets, policies, [float(b) for b in args.budgets.split(",")],
                     args.limit)
    print(f"[figures] notebooks on {results} -> {figures}", flush=True)
    run_notebooks(results, figures)


if __name__ == "__main__":
    main()
