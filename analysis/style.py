"""Shared look of the figures: policy order and colours, metric and budget labels, saving."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

# The order of the paper's legends and tables: the reference first, then the baselines, then the VLM methods.
POLICY_ORDER = ["full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "lookm", "elastic", "vlcache"]
POLICY_LABELS = {
    "full": "Full cache", "random": "Random", "streamingllm": "StreamingLLM", "h2o": "H2O",
    "snapkv": "SnapKV", "pyramidkv": "PyramidKV", "lookm": "LOOK-M", "elastic": "Elastic Cache",
    "vlcache": "VL-Cache",
}
METRIC_LABELS = {"anls": "ANLS", "exact_match": "Exact match", "accuracy": "Accuracy", "cider": "CIDEr",
                 "relaxed_accuracy": "Relaxed accuracy", "count_accuracy": "Accuracy"}
# Metrics that are not a fraction of correct answers: scaled by 100 but not called a percentage.
NOT_PERCENT = {"cider", "bleu", "meteor", "rouge_l", "spice"}


def policy_order(names) -> list[str]:
    """Known policies in the paper's order, unknown ones after them alphabetically."""
    names = [n for n in dict.fromkeys(names) if isinstance(n, str)]
    known = [p for p in POLICY_ORDER if p in names]
    return known + sorted(n for n in names if n not in POLICY_ORDER)


def policy_label(name: str) -> str:
    return POLICY_LABELS.get(name, name)


def policy_color(name: str):
    """A fixed colour per policy, so a policy looks the same in every figure."""
    cmap = plt.get_cmap("tab10")
    if name in POLICY_ORDER:
        return "black" if name == "full" else cmap(POLICY_ORDER.index(name) % 10)
    return plt.get_cmap("Dark2")(sum(map(ord, name)) % 8)


def metric_label(metric: str | None, scale: float = 100.0) -> str:
    """Axis label with units, e.g. "ANLS (%)", "CIDEr (×100)"."""
    name = METRIC_LABELS.get(metric or "", metric or "score")
    if scale == 1:
        return f"{name} (0–1)" if (metric or "") not in NOT_PERCENT else name
    if (metric or "") in NOT_PERCENT:
        return f"{name} (×{scale:g})"
    return f"{name} (%)" if scale == 100 else f"{name} (×{scale:g})"


def budget_label(budget: float) -> str:
    """0.1 → "10%", 0.005 → "0.5%"."""
    return f"{budget * 100:.3g}%"


def save(fig: Figure, path: str | Path | None, dpi: int = 150) -> Figure:
    """Writes `fig` as PNG when `path` is given (creating the folder); returns the figure."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return fig
