"""VL-Cache's allocation figure: per-layer post-vision sparsity γ_l and the per-layer budgets β_l it leads to.

Both come from metrics.json: `layer_sparsity` (averaged over a job's samples; null unless the policy's
allocator measures it, e.g. policy=vlcache) and `layer_budgets` (the kept fraction of the prompt's KV
entries per layer, over KV heads and samples).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import budget_label, policy_color, policy_label, policy_order, save


def mean_per_layer(values: pd.Series) -> np.ndarray | None:
    """Mean over jobs of equal-length per-layer lists (None when there are none)."""
    lists = [np.asarray(v, dtype=float) for v in values
             if isinstance(v, (list, tuple, np.ndarray)) and len(v)]
    if not lists or len({len(v) for v in lists}) != 1:
        return None
    return np.mean(lists, axis=0)


def _pick_budget(rows: pd.DataFrame) -> float | None:
    budgets = sorted(b for b in rows.loc[rows["policy"] != "full", "budget"].dropna().unique() if b < 1)
    if not budgets:
        return None
    return 0.1 if 0.1 in budgets else budgets[0]  # 10%: the budget VL-Cache's allocation figure shows


def allocation_figure(
    jobs: pd.DataFrame,
    budget: float | None = None,
    dataset: str | None = None,
    policies: list[str] | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Left: γ_l per layer, a line per dataset. Right: β_l per layer at `budget` on `dataset`, a line per
    policy, with the nominal budget dashed. Defaults: the first dataset; budget 10%, else the smallest."""
    ok = jobs[(jobs["status"] == "ok")] if "layer_budgets" in jobs.columns else jobs.iloc[:0]
    dataset = dataset or (sorted(ok["dataset"].dropna().unique()) or [None])[0]
    rows = ok[ok["dataset"] == dataset]
    budget = budget if budget is not None else _pick_budget(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))

    measured = ok[ok["layer_sparsity"].notna()] if "layer_sparsity" in ok.columns else ok.iloc[:0]
    for name in sorted(measured["dataset"].unique()):
        gamma = mean_per_layer(measured.loc[measured["dataset"] == name, "layer_sparsity"])
        if gamma is not None:
            left.plot(np.arange(len(gamma)), gamma * 100, marker="o", markersize=4, label=str(name))
    if left.lines:
        left.legend(title="Dataset", frameon=False)
        left.set_ylim(0, 105)
    else:
        left.text(0.5, 0.5, "no job measured γ_l\n(needs a sparsity allocator, e.g. policy=vlcache)",
                  ha="center", va="center", transform=left.transAxes, color="grey")
    left.set_xlabel("layer")
    left.set_ylabel("post-vision attention sparsity γ_l (%)")
    left.set_title("Per-layer sparsity γ_l")

    at_budget = rows.iloc[:0] if budget is None else rows[np.isclose(rows["budget"].astype(float), budget)]
    for policy in policies or policy_order(at_budget["policy"]):
        beta = mean_per_layer(at_budget.loc[at_budget["policy"] == policy, "layer_budgets"])
        if beta is not None:
            right.plot(np.arange(len(beta)), beta * 100, marker="o", markersize=4, color=policy_color(policy),
                       label=policy_label(policy))
    if budget is not None:
        right.axhline(budget * 100, color="grey", linestyle="--", linewidth=1,
                      label=f"nominal {budget_label(budget)}")
    if right.lines:
        right.legend(title="Policy", frameon=False, fontsize="small")
        right.set_ylim(bottom=0)
    right.set_xlabel("layer")
    right.set_ylabel("per-layer budget β_l (% of prompt KV kept)")
    right.set_title(f"Per-layer budgets at {budget_label(budget) if budget else '—'} ({dataset})")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return save(fig, path)


def job_allocation_figure(metrics: Mapping[str, Any], path: str | Path | None = None) -> Figure:
    """One job's per-layer budgets (bars) and, when measured, sparsity γ_l (line): the W&B per-job plot."""
    beta = metrics.get("layer_budgets")
    beta = np.asarray(beta if isinstance(beta, (list, tuple, np.ndarray)) else [], dtype=float)
    gamma = metrics.get("layer_sparsity")
    gamma = list(gamma) if isinstance(gamma, (list, tuple, np.ndarray)) else None  # NaN from pandas rows too
    fig, ax = plt.subplots(figsize=(6, 3.6))
    layers = np.arange(len(beta))
    ax.bar(layers, beta * 100, color=policy_color(str(metrics.get("policy"))), label="budget β_l")
    if metrics.get("budget") is not None:
        ax.axhline(float(metrics["budget"]) * 100, color="grey", linestyle="--", linewidth=1,
                   label=f"nominal {budget_label(float(metrics['budget']))}")
    ax.set_xlabel("layer")
    ax.set_ylabel("per-layer budget β_l (% of prompt KV kept)")
    ax.set_ylim(0, 105)
    handles, labels = ax.get_legend_handles_labels()
    if gamma:
        twin = ax.twinx()
        twin.plot(layers[: len(gamma)], np.asarray(gamma, dtype=float) * 100, color="black", marker="o",
                  markersize=4, label="sparsity γ_l")
        twin.set_ylabel("post-vision sparsity γ_l (%)")
        twin.set_ylim(0, 105)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, frameon=False, fontsize="small", loc="upper center",
              bbox_to_anchor=(0.5, -0.18), ncol=3)
    budget = budget_label(float(metrics["budget"])) if metrics.get("budget") is not None else "?"
    ax.set_title(f"{policy_label(str(metrics.get('policy')))} at {budget} on {metrics.get('dataset')} "
                 f"({metrics.get('model')})", fontsize="medium")
    if len(layers):
        ax.set_xticks(layers)
    fig.tight_layout()
    return save(fig, path)
