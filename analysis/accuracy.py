"""The paper's main figure: accuracy vs KV budget, one panel per dataset, one line per policy."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from analysis.style import budget_label, metric_label, policy_color, policy_label, policy_order, save


def _metric_of(rows: pd.DataFrame, column: str) -> str | None:
    """The metric's name for labels: the `metric` column for `accuracy`, else the column's last part."""
    if column != "accuracy":
        return column.split(".")[-1]
    names = rows["metric"].dropna() if "metric" in rows.columns else pd.Series(dtype=object)
    return str(names.iloc[0]) if len(names) else None


def accuracy_vs_budget(
    jobs: pd.DataFrame,
    column: str = "accuracy",
    datasets: list[str] | None = None,
    policies: list[str] | None = None,
    scale: float = 100.0,
    ncols: int = 3,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """Accuracy (`column`, ×`scale`) vs budget on a log axis, a panel per dataset and a line per policy.

    The full cache (policy `full`, any budget: it keeps everything) is a dashed horizontal reference line.
    Several jobs at one point (seeds, repeated sweeps) are averaged. Failed and incomplete jobs are drawn as
    crosses on the bottom edge at their budget, so a missing point is visibly missing rather than absent.
    """
    datasets = datasets or sorted(jobs["dataset"].dropna().unique())
    if not datasets:
        raise ValueError("no jobs to plot: the frame has no dataset values (is the results path right?)")
    ncols = max(1, min(ncols, len(datasets)))
    nrows = math.ceil(len(datasets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.8 * nrows), squeeze=False)
    ok = jobs[(jobs["status"] == "ok") & jobs[column].notna()] if column in jobs.columns else jobs.iloc[:0]
    bad = jobs[jobs["status"] != "ok"]
    handles: dict[str, Line2D] = {}
    for ax, dataset in zip(axes.flat, datasets):
        rows = ok[ok["dataset"] == dataset]
        names = policies or policy_order(jobs.loc[jobs["dataset"] == dataset, "policy"])
        budgets: set[float] = set()
        for policy in names:
            sub = rows[rows["policy"] == policy]
            if sub.empty:
                continue
            if policy == "full":
                ref = float(sub[column].mean()) * scale
                handles["full"] = ax.axhline(ref, color="black", linestyle="--", linewidth=1.2,
                                             label=f"{policy_label('full')} (budget 100%)")
                continue
            curve = sub.groupby("budget")[column].mean().sort_index() * scale
            budgets.update(curve.index)
            (line,) = ax.plot(curve.index, curve.values, marker="o", markersize=4, color=policy_color(policy),
                              label=policy_label(policy))
            handles[policy] = line
        failed = bad[(bad["dataset"] == dataset) & bad["budget"].between(0, 1, inclusive="right")]
        for _, job in failed.iterrows():
            ax.plot(job["budget"], 0.02, marker="x", markersize=8, color=policy_color(str(job["policy"])),
                    transform=ax.get_xaxis_transform(), clip_on=False, linestyle="none")
            budgets.add(job["budget"])
        if len(failed):
            handles["_failed"] = Line2D([], [], marker="x", color="grey", linestyle="none",
                                        label="failed / incomplete job")
        elsewhere = (bad["dataset"] == dataset).sum() - len(failed)
        if elsewhere:  # e.g. a budget outside (0, 1]: no place on the axis, but still not silently dropped
            ax.text(0.98, 0.98, f"{elsewhere} failed job(s) with no valid budget", ha="right", va="top",
                    transform=ax.transAxes, color="firebrick", fontsize="small")
        top = float(rows[column].max()) * scale * 1.08 if len(rows) else 0.0
        top = top if top > 0 else scale  # scores are >= 0; an all-zero panel still shows 0..100
        ax.set_ylim(-0.03 * top, top)  # a little below 0, so a curve at 0 is not hidden by the axis
        ax.set_xscale("log")
        ticks = sorted(b for b in budgets if b > 0)
        if ticks:
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([budget_label(b) for b in ticks], rotation=45 if len(ticks) > 6 else 0)
        ax.set_xlabel("KV cache budget (% of prompt KV entries, log scale)")
        ax.set_ylabel(metric_label(_metric_of(jobs[jobs["dataset"] == dataset], column), scale))
        ax.set_title(str(dataset))
        ax.grid(True, which="major", alpha=0.3)
        if not len(rows):
            ax.text(0.5, 0.5, "no finished job", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    order = [h for k, h in handles.items() if k == "full"] + [h for k, h in handles.items() if k != "full"]
    fig.legend(handles=order, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="Policy")
    models = ", ".join(sorted(map(str, jobs["model"].dropna().unique())))
    fig.suptitle(title or f"Accuracy vs KV cache budget ({models})")
    fig.tight_layout()
    return save(fig, path)
