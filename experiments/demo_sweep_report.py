"""The embedded sweep's report (`make sweep`): one accuracy-vs-budget table per task, and VL-Cache's measured
per-layer post-vision sparsity γ_l (VL-Cache, Tu et al. 2025, Sec. 4.1), as Markdown.

    python experiments/demo_sweep_report.py [outputs/sweeps/demo]

Scores are each job's metric (CIDEr for synth_caption, ANLS for synth_docvqa, accuracy otherwise); γ_l is the mean
over the task's VL-Cache jobs of the `layer_sparsity` their metrics.json records.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis import load_jobs  # noqa: E402  (after the path setup)
from analysis.allocation import mean_per_layer  # noqa: E402
from analysis.style import budget_label  # noqa: E402
from analysis.tables import FULL_ROW, main_table  # noqa: E402


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/sweeps/demo")
    jobs = load_jobs([root])
    ok = jobs[jobs["status"] == "ok"]
    print(f"{len(jobs)} jobs, {len(ok)} ok, under {root}\n")
    table = main_table(jobs, scale=1.0, average=False)  # (budget label, policy) x task, the mean of each cell
    budgets = sorted(b for b in jobs["budget"].dropna().unique() if 0 < b <= 1)
    policies = table.index.get_level_values("policy").unique()
    for task in table.columns:
        rows = ok[ok["dataset"] == task]
        grid = table[task].unstack("budget").reindex(index=policies)
        labels = [budget_label(b) for b in budgets]
        if "full" in grid.index:  # one row whatever the budget: shown under each
            grid.loc["full", labels] = grid.loc["full", FULL_ROW]
        print(f"| {task} {rows['metric'].iloc[0]} ({int(rows['n_samples'].max())} samples) | "
              + " | ".join(f"{b:g}" for b in budgets) + " |")  # fmt: skip
        print("| --- |" + " --- |" * len(budgets))
        for policy in policies:
            cells = grid.loc[policy, labels]
            print(f"| {policy} | " + " | ".join("" if v != v else f"{v:.3g}" for v in cells) + " |")
        print()
    gammas = {task: mean_per_layer(rows.loc[rows["policy"] == "vlcache", "layer_sparsity"])
              for task, rows in ok.groupby("dataset")}  # fmt: skip
    gammas = {task: g for task, g in gammas.items() if g is not None}
    layers = len(next(iter(gammas.values()))) if gammas else 0
    print("| task | " + " | ".join(f"γ_{i}" for i in range(layers)) + " |")
    print("| --- |" + " --- |" * layers)
    for task, gamma in gammas.items():
        print(f"| {task} | " + " | ".join(f"{v:.3f}" for v in gamma) + " |")


if __name__ == "__main__":
    main()
