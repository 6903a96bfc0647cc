"""The speed table and figure: prefill / decode / end-to-end speedup and KV memory per (batch, prompt length).

They read the speed benchmark's JSON (bench.md). Its schema, which the benchmark writes and this module reads,
is either a list of rows or an object `{"device": str, "note": str, "example": bool, "rows": [...]}`; a row is

    batch               int    sequences per batch
    prompt_len          int    prompt tokens per sequence (image tokens included)
    policy              str    "full" for the baselines, else the compressing policy's name
    budget              float  nominal budget (1.0 for the baselines)
    baseline            str | null
                               "hf_generate": plain transformers `generate`, full cache, SDPA;
                               "vlcache_full": the framework's own full-cache path;
                               null: a compressing policy run through the framework
    prefill_ms          float  prompt forward (scoring included), ms per batch
    decode_ms_per_token float  one decode step for the whole batch, ms
    e2e_ms              float  prefill + compression + every decode step (100 tokens in bench.md), ms
    kv_bytes            int    KV-cache bytes after compression (allocated)
    peak_gpu_bytes      int    peak GPU memory of the run
    device              str    GPU name (optional per row when the object gives it)

A speedup is the baseline's time over the row's time at the same (batch, prompt_len), so > 1 is faster.
`analysis/examples/speed_example.json` is an example of the schema with made-up numbers ("example": true):
figures drawn from such a file say "example, not measured" in their title.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.style import budget_label, policy_color, policy_label, policy_order, save

EXAMPLE = Path(__file__).resolve().parent / "examples" / "speed_example.json"
BASELINES = {"hf_generate": "HF generate, full cache", "vlcache_full": "vlcache, full cache"}
TIMES = {"prefill_ms": "Prefill", "decode_ms_per_token": "Decode (per token)", "e2e_ms": "End-to-end"}
GIB = 1024**3


def load_bench(source: str | Path | list[dict[str, Any]] | dict[str, Any] = EXAMPLE) -> pd.DataFrame:
    """The benchmark rows as a frame with a `system` column (what a bar is labelled) and attrs `device`,
    `example` (True for made-up numbers) and `note`."""
    data = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else source
    meta = data if isinstance(data, dict) else {}
    rows = meta.get("rows", []) if isinstance(data, dict) else data
    df = pd.DataFrame(rows)
    missing = {"batch", "prompt_len", "policy", "budget", "prefill_ms", "decode_ms_per_token", "e2e_ms",
               "kv_bytes"} - set(df.columns)
    if missing:
        raise ValueError(f"benchmark rows lack {sorted(missing)}; see analysis/speed.py for the schema")
    if "path" in df.columns:  # experiments/bench_decode.py marks its rows by path, and baseline as a flag
        df["baseline"] = [
            "hf_generate" if path == "transformers" else "vlcache_full" if path == "fast" and pol == "full" else None
            for path, pol in zip(df["path"], df["policy"])
        ]
    if "baseline" not in df.columns:
        df["baseline"] = None
    # pandas' string columns hold NaN, not None, for a null baseline
    df["system"] = [BASELINES.get(b, b) if isinstance(b, str) and b
                    else f"{policy_label(p)} @ {budget_label(float(x))}"
                    for b, p, x in zip(df["baseline"], df["policy"], df["budget"])]
    devices = df["device"].dropna().unique().tolist() if "device" in df.columns else []
    df.attrs["device"] = meta.get("device") or (", ".join(map(str, devices)) if devices else "unknown device")
    note = str(meta.get("note", ""))
    df.attrs["example"] = bool(meta.get("example")) or "not measured" in note
    df.attrs["note"] = note
    return df.sort_values(["batch", "prompt_len"], kind="stable").reset_index(drop=True)


def speed_table(bench: pd.DataFrame, baseline: str = "hf_generate") -> pd.DataFrame:
    """One row per (batch, prompt_len, system): times, KV GiB, and speedups against `baseline`
    ("hf_generate" or "vlcache_full"), plus KV memory as a fraction of the framework's full cache."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
    out = []
    for (batch, length), point in bench.groupby(["batch", "prompt_len"], sort=True):
        base = point[point["baseline"] == baseline]
        full = point[point["baseline"] == "vlcache_full"]
        for _, row in point.iterrows():
            rec = {"batch": batch, "prompt_len": length, "system": row["system"], "policy": row["policy"],
                   "budget": row["budget"], "baseline": row["baseline"]}
            rec.update({k: row[k] for k in TIMES})
            rec["kv_gib"] = row["kv_bytes"] / GIB
            rec["peak_gib"] = row.get("peak_gpu_bytes", np.nan) / GIB
            for key, name in zip(TIMES, ("prefill", "decode", "e2e")):
                # a row without that phase (a decode-only synthetic cache has no prefill) has no speedup
                rec[f"{name}_speedup"] = float(base[key].iloc[0]) / row[key] if len(base) and row[key] > 0 else np.nan
            rec["kv_fraction"] = row["kv_bytes"] / float(full["kv_bytes"].iloc[0]) if len(full) else np.nan
            out.append(rec)
    return pd.DataFrame(out).set_index(["batch", "prompt_len", "system"])


def _point_label(batch: int, length: int) -> str:
    tokens = f"{length // 1024}K" if length % 1024 == 0 and length >= 1024 else str(length)
    return f"({batch}, {tokens})"


def _systems(bench: pd.DataFrame) -> list[str]:
    """Baselines first, then policies in the paper's order."""
    base = [BASELINES[b] for b in BASELINES if (bench["baseline"] == b).any()]
    rest = bench[bench["baseline"].isna()]
    ordered = []
    for policy in policy_order(rest["policy"]):
        ordered += list(dict.fromkeys(rest.loc[rest["policy"] == policy, "system"]))
    return base + ordered


def _color(system: str, bench: pd.DataFrame):
    if system == BASELINES["hf_generate"]:
        return "0.55"
    if system == BASELINES["vlcache_full"]:
        return "black"
    return policy_color(str(bench.loc[bench["system"] == system, "policy"].iloc[0]))


def speed_figure(bench: pd.DataFrame | str | Path = EXAMPLE, baseline: str = "hf_generate",
                 path: str | Path | None = None) -> Figure:
    """Four panels over the (batch, prompt length) points: prefill, decode and end-to-end speedup against
    `baseline` (grouped bars, 1× marked), and KV-cache memory in GiB (log scale) for every system."""
    if not isinstance(bench, pd.DataFrame):
        bench = load_bench(bench)
    table = speed_table(bench, baseline).reset_index()
    points = list(dict.fromkeys(zip(table["batch"], table["prompt_len"])))
    x = np.arange(len(points))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    systems = _systems(bench)
    panels = [("prefill_speedup", "Prefill"), ("decode_speedup", "Decode (per token)"),
              ("e2e_speedup", "End-to-end (prefill + decode)"), ("kv_gib", "KV-cache memory")]
    for ax, (key, name) in zip(axes.flat, panels):
        shown = [s for s in systems if key == "kv_gib" or s != BASELINES[baseline]]
        width = 0.8 / max(len(shown), 1)
        for i, system in enumerate(shown):
            sub = table[table["system"] == system].set_index(["batch", "prompt_len"])
            values = [sub[key].get(p, np.nan) for p in points]
            ax.bar(x + (i - (len(shown) - 1) / 2) * width, values, width, label=system,
                   color=_color(system, bench), edgecolor="white", linewidth=0.5)
        ax.set_xticks(x, [_point_label(*p) for p in points])
        ax.set_xlabel("(batch size, prompt length in tokens)")
        if key == "kv_gib":
            ax.set_yscale("log")
            ax.set_ylabel("KV cache after compression (GiB, log scale)")
        else:
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_ylabel(f"speedup vs {BASELINES[baseline]} (×)")
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
    handles, labels = axes[1, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="System")
    title = f"Speed and KV memory on {bench.attrs.get('device', 'unknown device')}"
    if bench.attrs.get("example"):
        title += "\nEXAMPLE, NOT MEASURED: made-up numbers showing the benchmark schema"
    fig.suptitle(title, color="firebrick" if bench.attrs.get("example") else "black")
    fig.tight_layout()
    return save(fig, path)
