"""Programmatic dependent launch in a CUDA graph, in isolation: where the step-level PDL slowdown comes from.

Chains of kernels captured in one graph, timed with PDL off and in three placements of the grid dependency
control: ``wait+trigger`` (wait for the previous kernel, then let the next launch: what `launch.pdl_enter`
does), ``wait`` (no explicit trigger: the next kernel launches when this one exits) and ``trigger+wait`` (let the
next launch first). Chains: 64 small Triton kernels (one row of 4096, as RMSNorm at batch 1); 64 Triton kernels
each streaming 32 MB (a decode projection's weights); the same streaming kernels alternating with a cuBLAS
matrix-vector product (the step's q/k/v and gate/up projections are cuBLAS).

    PYTHONPATH=. python experiments/pdl_micro.py --out results/bench/pdl_micro_h200.json

(The JSON's run timed each graph with 20 warm-up and 200 timed replays; `graph_ms`, used now, takes 10 and 50.)

Why it exists: a draft launched the fused decode step's seven Triton kernels per layer (RMSNorm ×2, the decode
attention's split and combine, the output and down projections, SwiGLU) with PDL, each waiting for its
predecessor first. Its tokens were unchanged, but on an H200 (2026-11-21, bench_decode's synthetic caches, median of
two rounds, same run) the step got slower with wait+trigger: batch 1, 2K prompt, budget 0.1: 4.198 → 4.422
ms/token; batch 4, 32K, budget 0.1: 4.710 → 5.038; batch 4, 32K, budget 1.0: 7.893 → 8.203. Trigger+wait was
as slow, and wait alone was unchanged (4.205, 4.715, 7.900). The draft was not kept. This script, on the same
H200 (results/bench/pdl_micro_h200.json), bounds what PDL could buy: per link, 1.40 → 0.94 µs for the small
kernels, 16.9 → 16.3 µs for the streaming ones (trigger+wait: 20.6, the next kernel's waiting programs slowing
this one's), and nothing where a cuBLAS kernel sits between two Triton ones, as it does twice per layer of the step.

Tried again once every projection up to 64 rows was a Triton kernel (2026-11-22, a draft, not kept): the four
projections launched with PDL, each prefetching into L2 the first 256, 1024 or 4096 of K of its own weight rows
(which do not depend on the previous kernel) before `gdc_wait`, then `gdc_launch_dependents`; the attention's last
launch triggering at its start. `experiments/step_forms_ab.py` with the draft's forms, synthetic caches, 50 tokens,
two rounds, one H200 run (results/bench/step_forms_ab_pdl_h200.json), ms per token at budget 0.1, same tokens:

| form | (64, 2K) | (1, 2K) |
| --- | --- | --- |
| current (no PDL) | 4.843 | 4.059 |
| PDL, wait only (the attention not triggering) | 4.875 | 4.702 |
| PDL, the attention triggering | 4.873 | 4.698 |
| + prefetch 256 of K | 4.848 | 4.598 |
| + prefetch 1024 of K | 4.930 | 4.997 |
| + prefetch 4096 of K | 5.924 | 5.666 |

Launching a projection with PDL costs about 5 µs at batch 1 (0.64 ms over the step's 128), whatever the
predecessor does; a small prefetch wins back a sixth of that, a large one competes with the predecessor's own
stream.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from experiments.bench_decode import graph_ms

MODES = {"off": 0, "wait+trigger": 1, "wait": 2, "trigger+wait": 3}


@triton.jit
def _enter(MODE: tl.constexpr):
    if MODE == 1:
        gdc_wait()
        gdc_launch_dependents()
    if MODE == 2:
        gdc_wait()
    if MODE == 3:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def _row_kernel(x_ptr, y_ptr, N, MODE: tl.constexpr, BLOCK: tl.constexpr):
    _enter(MODE)
    c = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + c, mask=c < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + c, (x * 0.5 + 1.0).to(y_ptr.dtype.element_ty), mask=c < N)


@triton.jit
def _stream_kernel(w_ptr, x_ptr, y_ptr, K, MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n] = sum_k w[n, k] * x[k] for BLOCK_N rows per program (a matrix-vector product)."""
    _enter(MODE)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + kk[None, :]).to(tl.float32)
        x = tl.load(x_ptr + kk).to(tl.float32)
        acc += tl.sum(w * x[None, :], 1)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "pdl_micro.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    n, K, N = 4096, 4096, 4096
    xs = [torch.randn(n, device=dev, dtype=torch.bfloat16) for _ in range(args.chain + 1)]
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(args.chain)]  # 32 MB each
    wc = torch.randn(N, K, device=dev, dtype=torch.bfloat16)

    def rows(mode):
        for i in range(args.chain):
            _row_kernel[(1,)](xs[i], xs[i + 1], n, MODE=mode, BLOCK=4096, num_warps=8, launch_pdl=mode > 0)

    def stream(mode, cublas=False):
        for i in range(args.chain):
            _stream_kernel[(N // 32,)](ws[i], xs[i], xs[i + 1], K, MODE=mode, BLOCK_N=32, BLOCK_K=256,
                                       num_warps=4, num_stages=4, launch_pdl=mode > 0)  # fmt: skip
            if cublas:
                xs[i + 1].copy_(torch.mv(wc, xs[i + 1]))

    out = []
    for name, fn, per in (("small rows", rows, args.chain), ("stream 32 MB", stream, args.chain),
                          ("stream 32 MB + cuBLAS mv", lambda m: stream(m, True), args.chain)):  # fmt: skip
        res = {}
        for _ in range(2):  # second pass: the reported one (the first compiles and warms)
            for mode, code in MODES.items():
                res[mode] = graph_ms(lambda code=code, fn=fn: fn(code)) * 1e3 / per
        out.append(dict(chain=name, us_per_link=res))
        print(f"{name:<26} " + "  ".join(f"{m} {t:7.2f}" for m, t in res.items()) + "  (µs per link)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
