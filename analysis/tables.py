"""The paper's main table: policies × budgets × datasets with the average, as a DataFrame, LaTeX, Markdown."""

from __future__ import annotations

import math

import pandas as pd

from analysis.style import budget_label, policy_label, policy_order

FULL_ROW = "full cache"
AVERAGE = "Average"


def main_table(
    jobs: pd.DataFrame,
    column: str = "accuracy",
    budgets: list[float] | None = None,
    policies: list[str] | None = None,
    datasets: list[str] | None = None,
    scale: float = 100.0,
    average: bool = True,
) -> pd.DataFrame:
    """Scores (`column` × `scale`) of finished jobs, indexed by (budget, policy), a column per dataset.

    The full cache is one row, budget label "full cache", whatever budget its jobs ran at. Other rows are
    grouped by budget (labels such as "10%"), policies in the paper's order. Several jobs in one cell
    (seeds, repeated sweeps) are averaged. A cell without a finished job is NaN, and so is its row's
    `Average` (the mean over the row's datasets): an average over fewer datasets would not be comparable.
    """
    ok = jobs[(jobs["status"] == "ok") & jobs[column].notna()].copy()
    datasets = datasets or sorted(jobs["dataset"].dropna().unique())
    policies = policies or policy_order(jobs["policy"])
    if budgets is None:  # every budget some job asked for, failed ones included: their cells show as missing
        asked = jobs.loc[jobs["policy"] != "full", "budget"].dropna()
        budgets = sorted(b for b in asked.unique() if 0 < b <= 1)
    ok[column] = ok[column].astype(float) * scale
    cells = ok.groupby(["policy", "budget", "dataset"])[column].mean()
    full = ok[ok["policy"] == "full"].groupby("dataset")[column].mean()
    rows, index = [], []
    if "full" in policies:
        rows.append([full.get(d, math.nan) for d in datasets])
        index.append((FULL_ROW, "full"))
    for budget in budgets:
        for policy in policies:
            if policy == "full":
                continue
            rows.append([cells.get((policy, budget, d), math.nan) for d in datasets])
            index.append((budget_label(budget), policy))
    table = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["budget", "policy"]),
                         columns=pd.Index(datasets, name="dataset"))
    if average and len(datasets) > 1:
        table[AVERAGE] = table[datasets].mean(axis=1, skipna=False)
    return table


def _best_per_budget(table: pd.DataFrame) -> pd.DataFrame:
    """True where a cell is the best compressed policy of its budget. Never bolded: the full cache, and a
    budget's column where fewer than two policies finished or all of them score the same."""
    best = pd.DataFrame(False, index=table.index, columns=table.columns)
    for budget in table.index.get_level_values(0).unique():
        if budget == FULL_ROW:
            continue
        group = table.loc[[budget]]
        if len(group) < 2:
            continue
        for col in table.columns:
            top = group[col].max()
            # one finished policy, or all tied: nothing stands out
            if not math.isnan(top) and group[col].nunique() > 1:
                best.loc[group.index[group[col] == top], col] = True
    return best


def _cell(value: float, digits: int) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def to_markdown(table: pd.DataFrame, digits: int = 1, bold_best: bool = True) -> str:
    """A GitHub Markdown table; the best policy of each budget in bold, missing cells as —."""
    best = _best_per_budget(table) if bold_best else None
    header = ["Budget", "Policy", *map(str, table.columns)]
    rule = ["---"] * 2 + ["---:"] * len(table.columns)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    previous = None
    for (budget, policy), values in table.iterrows():
        cells = []
        for col, value in values.items():
            text = _cell(value, digits)
            cells.append(f"**{text}**" if best is not None and best.loc[(budget, policy), col] else text)
        shown = budget if budget != previous else ""
        previous = budget
        lines.append("| " + " | ".join([shown, policy_label(policy), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(table: pd.DataFrame, digits: int = 1, bold_best: bool = True, caption: str | None = None,
             label: str = "tab:main") -> str:
    """A booktabs LaTeX table (needs `\\usepackage{booktabs}`): a rule between budgets, best in bold."""
    best = _best_per_budget(table) if bold_best else None
    cols = "ll" + "r" * len(table.columns)
    out = [r"\begin{table}[t]", r"\centering"]
    if caption:
        out.append(rf"\caption{{{_tex(caption)}}}")
    out += [rf"\label{{{label}}}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
            " & ".join(["Budget", "Policy", *(_tex(str(c)) for c in table.columns)]) + r" \\", r"\midrule"]
    previous = None
    for (budget, policy), values in table.iterrows():
        if previous is not None and budget != previous:
            out.append(r"\midrule")
        cells = []
        for col, value in values.items():
            text = _cell(value, digits).replace("—", "--")
            bold = best is not None and best.loc[(budget, policy), col]
            cells.append(rf"\textbf{{{text}}}" if bold else text)
        shown = _tex(budget) if budget != previous else ""
        previous = budget
        out.append(" & ".join([shown, _tex(policy_label(policy)), *cells]) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def table_figure(table: pd.DataFrame, digits: int = 1, title: str | None = None, path=None):
    """The table as an image (for slides and the notebook's PNG): a cell per value, shaded by the value
    within its column, the best compressed policy of each budget in bold, missing cells as —."""
    import matplotlib.pyplot as plt
    import numpy as np

    from analysis.style import save

    best = _best_per_budget(table)
    values = table.to_numpy(dtype=float)
    text = [[_cell(v, digits) for v in row] for row in values]
    rows = [f"{b} · {policy_label(p)}" if b != FULL_ROW else "Full cache" for b, p in table.index]
    fig, ax = plt.subplots(figsize=(2.2 + 1.25 * len(table.columns), 0.6 + 0.27 * (len(rows) + 1)))
    ax.axis("off")
    finite = values[np.isfinite(values)]
    lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    shade = plt.get_cmap("Greens")
    colours = [[shade(0.1 + 0.5 * ((v - lo) / (hi - lo) if hi > lo else 0)) if np.isfinite(v) else "white"
                for v in row] for row in values]
    cells = ax.table(cellText=text, rowLabels=rows, colLabels=[str(c) for c in table.columns],
                     cellColours=colours, cellLoc="right", bbox=[0, 0, 1, 1])
    cells.auto_set_font_size(False)
    cells.set_fontsize(9)
    for (r, c), cell in cells.get_celld().items():
        if r > 0 and c >= 0 and best.iloc[r - 1, c]:
            cell.get_text().set_fontweight("bold")
    ax.set_title(title or "Score (×100) per budget and policy; best compressed policy per budget in bold",
                 fontsize="medium")
    fig.tight_layout()
    return save(fig, path)
