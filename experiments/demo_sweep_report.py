"""The embedded sweep's report (`make sweep`): one accuracy-vs-budget table per task, and VL-Cache's measured
per-layer post-vision sparsity γ_l (VL-Cache, Tu et al. 2025, Sec. 4.1), as Markdown.

    python experiments/demo_sweep_report.py [outputs/sweeps/demo]

Scores are each job's metric (CIDEr for synth_caption, ANLS for synth_docvqa, accuracy otherwise); γ_l is the mean
over the task's VL-Cache jobs of the `layer_sparsity` their metrics.json records.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis import load_jobs  # noqa: E402  (after the path setup)
from analysis.style import policy_order  # noqa: E402


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/sweeps/demo")
    jobs = load_jobs([root])
    ok = jobs[jobs["status"] == "ok"]
    print(f"{len(jobs)} jobs, {len(ok)} ok, under {root}\n")
    budgets = sorted(b for b in jobs["budget"].dropna().unique() if 0 < b <= 1)
    policies = policy_order(jobs["policy"])
    for task in sorted(jobs["dataset"].unique()):
        rows = ok[ok["dataset"] == task]
        metric = rows["metric"].iloc[0] if "metric" in rows and len(rows) else "score"
        n = int(rows["n_samples"].max()) if "n_samples" in rows and len(rows) else 0
        print(f"| {task} {metric} ({n} samples) | " + " | ".join(f"{b:g}" for b in budgets) + " |")
        print("| --- |" + " --- |" * len(budgets))
        for policy in policies:
            cells = []
            for b in budgets:
                sel = rows[(rows["policy"] == policy) & (rows["budget"] == b)]["accuracy"]
                cells.append("" if sel.empty else f"{sel.mean():.3g}")
            print(f"| {policy} | " + " | ".join(cells) + " |")
        print()
    print("| task | " + " | ".join(f"γ_{i}" for i in range(_layers(ok))) + " |")
    print("| --- |" + " --- |" * _layers(ok))
    for task in sorted(ok["dataset"].unique()):
        gammas = [np.asarray(g, dtype=float) for g in ok[(ok["dataset"] == task) & (ok["policy"] == "vlcache")]
                  ["layer_sparsity"] if g is not None and not (isinstance(g, float) and np.isnan(g))]  # fmt: skip
        if gammas:
            print(f"| {task} | " + " | ".join(f"{v:.3f}" for v in np.mean(gammas, axis=0)) + " |")


def _layers(ok) -> int:
    sparsity = [g for g in ok["layer_sparsity"] if isinstance(g, (list, tuple, np.ndarray))]
    return len(sparsity[0]) if sparsity else 0


if __name__ == "__main__":
    main()
