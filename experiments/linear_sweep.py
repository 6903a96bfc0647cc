"""The decode step's projections: cuBLAS (`F.linear`) against `vlcache.kernels.linear.decode_linear` in a grid of
launch configs, at a few rows. Each form is timed as one CUDA graph of 32 calls over 32 layers' own weights
(memory, not L2), reported per call and as the fraction of the measured copy bandwidth that reading the weights
once would take; each Triton result is checked against cuBLAS's.

    PYTHONPATH=. python experiments/linear_sweep.py --out results/bench/linear_sweep_h200.json

LLaVA-1.6-Mistral-7B's shapes (hidden 4096, 32 query and 8 KV heads of 128, MLP 14336), bf16.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from experiments.bench_decode import graph_ms, measure_copy_bw
from vlcache.kernels.fused_ops import silu_mul
from vlcache.kernels.linear import LinearConfig, decode_linear, swiglu_linear

SHAPES = {
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "swiglu": (28672, 4096),  # gate/up then SwiGLU: cuBLAS + silu_mul against swiglu_linear's one launch
}
GRID = [
    LinearConfig(block_n=bn, block_k=bk, num_warps=4, num_stages=st)
    for bn, bk, st in itertools.product((32, 64), (128, 256), (3, 5))
] + [LinearConfig(32, 512, 4, 3)]
GRID_SWIGLU = GRID + [LinearConfig(16, bk, 4, st) for bk, st in itertools.product((128, 256), (3, 5))]
# deeper pipelines and narrower tiles, for the projections that stream few K steps per program (o, q/k/v)
GRID_DEEP = [
    LinearConfig(block_n=bn, block_k=bk, num_warps=nw, num_stages=st)
    for bn, bk, nw, st in itertools.product((16, 32, 64), (128, 256), (4, 8), (4, 6, 8))
]
# 17-64 rows (one 64-row tile): wider column tiles, so fewer programs re-read the input, and K split between
# programs, so the narrow projections still fill the GPU
GRID_WIDE = [
    LinearConfig(block_n=bn, block_k=bk, num_warps=nw, num_stages=st, split_k=sk)
    for bn, bk, nw, st, sk in itertools.product((64, 128), (64, 128), (4, 8), (3, 5), (1, 2, 4))
    if not (bn == 128 and bk == 128 and st == 5)  # beyond shared memory
]
# around GRID_WIDE's best (64 columns, 128 of K, 5 stages): narrower tiles, longer K steps, deeper pipelines
GRID_WIDE_DEEP = [
    LinearConfig(block_n=bn, block_k=bk, num_warps=4, num_stages=st, split_k=sk)
    for bn, bk, st, sk in itertools.product((32, 64), (64, 128, 256), (4, 5, 6), (1, 2))
    if bn * bk * st <= 64 * 128 * 6  # beyond shared memory
]


def time_form(rows, name, batch, form, weights, fn, bw, err=None) -> dict:
    n, k = SHAPES[name]
    ms = graph_ms(lambda: [fn(w) for w in weights]) / len(weights)
    row = dict(gemm=name, batch=batch, form=form, us=ms * 1e3, frac_of_copy_bw=n * k * 2 / (ms * 1e-3) / bw,
               max_rel_err=err)  # fmt: skip
    rows.append(row)
    tail = f" err {err:.1e}" if err is not None else ""
    print(f"{name:8s} B={batch:3d} {form:24s} {row['us']:7.1f} us {row['frac_of_copy_bw']:.2f}{tail}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--deep", action="store_true", help="GRID_DEEP instead of GRID (not for swiglu)")
    ap.add_argument("--wide", action="store_true", help="GRID_WIDE, for 17-64 rows (e.g. --batches 64)")
    ap.add_argument("--wide-deep", action="store_true", help="GRID_WIDE_DEEP, for 17-64 rows")
    ap.add_argument("--out", default="results/bench/linear_sweep.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = measure_copy_bw(device)
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5 for _ in range(32)]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, k, device=device, dtype=torch.bfloat16)
            swiglu = name == "swiglu"
            if swiglu:
                ref = silu_mul(F.linear(x, weights[0])).float()
                base = time_form(rows, name, batch, "cublas+silu_mul", weights,
                                 lambda w, x=x: silu_mul(F.linear(x, w)), bw)  # fmt: skip
            else:
                ref = F.linear(x, weights[0]).float()
                base = time_form(rows, name, batch, "cublas", weights, lambda w, x=x: F.linear(x, w), bw)
            fn = swiglu_linear if swiglu else decode_linear
            best = None
            grids = ((args.wide_deep, GRID_WIDE_DEEP), (args.wide, GRID_WIDE), (swiglu, GRID_SWIGLU),
                     (args.deep, GRID_DEEP))  # fmt: skip
            grid = next((g for on, g in grids if on), GRID)
            for cfg in grid:
                tag = f"bn{cfg.block_n} bk{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} k{cfg.split_k}"
                try:
                    out = fn(x, weights[0], config=cfg).float()
                except Exception as e:  # noqa: BLE001  (a config too large for shared memory: skipped)
                    print(f"{name:8s} B={batch:3d} {tag}: {type(e).__name__}", flush=True)
                    continue
                err = float((out - ref).abs().max() / ref.abs().max())
                row = time_form(rows, name, batch, tag, weights,
                                lambda w, x=x, cfg=cfg, fn=fn: fn(x, w, config=cfg), bw, err)  # fmt: skip
                best = row if best is None or row["us"] < best["us"] else best
            print(f"  best: {best['form']} {best['us']:.1f} us against cuBLAS {base['us']:.1f}")
        del weights
    meta = dict(device=torch.cuda.get_device_name(device), copy_bw_bytes_per_s=bw)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
