"""Launch configurations of the ragged decode-attention kernel, timed as the decode step runs it: one CUDA graph
of one call per layer over 32 layers' own buffers (so the keys come from memory, not from L2, and the graph's
launch gaps are those of the step), at the decode benchmark's points and budgets.

    PYTHONPATH=. python experiments/decode_kernel_sweep.py --out results/bench/decode_kernel_sweep_h200.json

Prints, per point, the configurations sorted by time per layer, with the fraction of the measured copy
bandwidth (bytes = the valid keys and values once); the JSON holds every row. The shapes are LLaVA-1.6-Mistral-
7B's (8 KV heads, 32 query heads, head dim 128, bf16); each row's length is the budget's share of the prompt
±25% (ragged), capacity = the longest row + 100 generated tokens.

results/bench/decode_kernel_sweep_h200.json is this sweep's first run (2026-11-21), before `row_waves` existed:
its grid varied `k_rows` (key tiles loaded as [BLOCK_N, D] rows and transposed in registers) where this one
varies `row_waves`. Loading keys as rows changed nothing (within 0.1 µs at every point), so it was removed;
what that run found is that one split at batch 64 × 8 KV heads beat two (17.9 against 22.5 µs per layer),
which `row_waves` now does. That run timed with a timer and a copy-bandwidth measure of its own (CUDA events
around single replays); the script now uses bench_decode's `graph_ms` and `measure_copy_bw`.

``--wide`` times 60 more configurations at budget 0.1: 64- and 128-key tiles, 4 and 8 warps, 2-4 stages, 2-8
waves (results/bench/decode_kernel_sweep_wide_h200.json, `--points 4x32768,1x131072,1x32768 --budgets 0.1`,
2026-11-21). None is clearly better than the default: the best were 21.1 against 21.7 µs per layer at (4, 32K),
22.5 against 22.8 at (1, 128K) and the default itself at (1, 32K), each a different configuration. About 8 µs
of each layer's decode attention at budget 0.1 is fixed (11.6 µs for 13.5 MB at (1, 32K), 21.7 for 53.7 MB at
(4, 32K)): the two launches and their ramps, not the key loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections.abc import Callable, Sequence

import torch

from experiments.bench_decode import graph_ms, measure_copy_bw
from vlcache.kernels.decode_attention import DEFAULT_CONFIG, DecodeConfig, decode_attention, num_splits

LAYERS, HKV, HQ, D = 32, 8, 32, 128


def layers(batch: int, n: int, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    cap = int(n * 1.25) + 100
    out = []
    for _ in range(LAYERS):
        k = torch.randn(batch, HKV, cap, D, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn(batch, HKV, cap, D, device=device, dtype=torch.bfloat16, generator=g)
        length = (n * (1 + 0.25 * (2 * torch.rand(batch, HKV, device=device, generator=g) - 1))).long()
        out.append((k, v, length.clamp(1, cap)))
    q = torch.randn(batch, HQ, 1, D, device=device, dtype=torch.bfloat16, generator=g)
    return q, out


Step = Callable[[], object]
"""One form of the work timed at a point: what `graph_ms` captures (its result is what a `Check` sees)."""
Check = Callable[[str, object], None]
"""Raises where a form's result (`check(name, step())`) is wrong."""


def time_rounds(forms: dict[str, Step], rounds: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each form's µs per layer (`graph_ms` of its 32-layer step over `LAYERS`), `rounds` rounds timing every form
    in turn so that drift between forms cancels: (the medians, every round's)."""
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(rounds):
        for name, step in forms.items():
            times[name].append(graph_ms(step) * 1e3 / LAYERS)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, times


def sweep_forms(
    points: Sequence[str],
    budgets: Sequence[float],
    rounds: int,
    device: torch.device,
    forms_for: Callable[[int, torch.Tensor, list], tuple[dict[str, Step], Check | None]],
) -> list[dict]:
    """Times forms of one step against each other, as the sweep above times the attention: at each point
    (``BATCHxPROMPT``) and budget, one CUDA graph of a form over `layers`' 32 layers' own buffers (`graph_ms`).

    `forms_for(batch, q, lay)` (the point's query and layers) returns the forms, name -> step in the order they are
    timed, and a check or None. Each form is checked once, before the timing (it is the same work every round);
    then `rounds` rounds time every form in turn, so drift between forms cancels. Prints each point's medians
    (µs per layer) and returns one row per point and budget: `point`, `budget`, `us_per_layer` (the medians by
    form) and `all` (every round's)."""
    rows = []
    for point in points:
        batch, prompt = (int(x) for x in point.split("x"))
        for budget in budgets:
            q, lay = layers(batch, max(1, round(budget * prompt)), device)
            forms, check = forms_for(batch, q, lay)
            if check is not None:
                for name, step in forms.items():
                    check(name, step())
            med, times = time_rounds(forms, rounds)
            rows.append(dict(point=point, budget=budget, us_per_layer=med, all=times))
            print(f"{point} budget {budget}: " + "  ".join(f"{k} {v:6.2f}" for k, v in med.items()) + " us/layer",
                  flush=True)  # fmt: skip
            del q, lay, forms, check  # the forms' closures hold the layers too
            torch.cuda.empty_cache()
    return rows


def configs(full_only: bool, wide: bool = False) -> list[DecodeConfig]:
    if wide:  # larger key tiles, more warps and splits, deeper pipelines
        grid = itertools.product((2, 3, 4, 6, 8), (64, 128), (4, 8), (2, 3, 4))
        return [DEFAULT_CONFIG] + [
            dataclasses.replace(DEFAULT_CONFIG, waves=w, block_n=bn, num_warps=nw, num_stages=ns, min_keys_per_split=64)
            for w, bn, nw, ns in grid
        ]
    if full_only:
        return [DEFAULT_CONFIG, dataclasses.replace(DEFAULT_CONFIG, row_waves=float("inf"))]
    grid = itertools.product((1, 2, 4), (16, 32, 64), (2, 4), (2, 3, 4), (2.0, float("inf")))
    return [
        dataclasses.replace(DEFAULT_CONFIG, waves=w, block_n=bn, num_warps=nw, num_stages=ns, row_waves=rw)
        for w, bn, nw, ns, rw in grid
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="64x2048,4x32768,1x131072,1x32768,1x2048")
    ap.add_argument("--budgets", default="0.1,1.0")
    ap.add_argument("--wide", action="store_true", help="a grid of larger tiles, more warps, splits and stages")
    ap.add_argument("--out", default="results/bench/decode_kernel_sweep.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = measure_copy_bw(device)
    rows = []
    for point in args.points.split(","):
        batch, prompt = (int(x) for x in point.split("x"))
        for budget in (float(b) for b in args.budgets.split(",")):
            q, lay = layers(batch, max(1, round(budget * prompt)), device)
            nbytes = sum(2 * int(length.sum()) * D * 2 for _, _, length in lay)
            k0, v0, l0 = lay[0]
            ref = decode_attention(q.float(), k0.float(), v0.float(), l0, backend="torch")
            found = []
            for c in configs(full_only=budget == 1.0, wide=args.wide):
                try:
                    err = float((decode_attention(q, k0, v0, l0, config=c).float() - ref).norm() / ref.norm())
                    step = lambda c=c, q=q, lay=lay: [decode_attention(q, k, v, n, config=c) for k, v, n in lay]  # noqa: E731
                    ms = graph_ms(step)
                except Exception as e:  # noqa: BLE001  (a configuration that does not compile is reported)
                    rows.append(dict(point=point, budget=budget, config=dataclasses.asdict(c), error=str(e)[:200]))
                    continue
                row = dict(
                    point=point,
                    budget=budget,
                    config=dataclasses.asdict(c),
                    splits=num_splits(batch, HKV, k0.shape[2], device, c),
                    us_per_layer=ms * 1e3 / LAYERS,
                    frac_of_copy_bw=nbytes / (ms * 1e-3) / bw,
                    rel_err=err,
                )
                rows.append(row)
                found.append(row)
            found.sort(key=lambda r: r["us_per_layer"])
            default = next(r for r in found if r["config"] == dataclasses.asdict(DEFAULT_CONFIG))
            print(
                f"\n{point} budget {budget}: {nbytes / LAYERS / 1e6:.1f} MB per layer; default "
                f"{default['us_per_layer']:.1f} us ({default['frac_of_copy_bw']:.2f} of copy bw)"
            )
            for r in found[:8]:
                c = r["config"]
                print(
                    f"  {r['us_per_layer']:7.1f} us  {r['frac_of_copy_bw']:.2f}  splits {r['splits']:3d}  "
                    f"waves {c['waves']} block_n {c['block_n']} warps {c['num_warps']} stages "
                    f"{c['num_stages']} row_waves {c['row_waves']}  err {r['rel_err']:.1e}"
                )
            del lay
            torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(device), copy_bw_bytes_per_s=bw, torch=torch.__version__)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
