"""Probe: can the output projection's weights be read into L2 while the decode attention runs, so that the projection
then reads them from L2? At budget 0.1 the attention of a long cache uses about two thirds of the copy bandwidth
(decode_kernel_sweep.py: its ramp and tail leave HBM idle), so a concurrent read of the next projection's weights
could ride in the gap.

Times one CUDA graph of 32 layers of (decode attention, output projection) over their own buffers at a (batch,
prompt, budget) point, in three forms:

* ``plain``: as the fused step runs them;
* ``prefetch``: a side stream reads layer i's `W_o` (loads with ``evict_last``, summed into a dummy) while layer
  i's attention runs; the side stream joins the main one at the end of the graph (the read is only a hint);
* ``prefetch-join``: the same, joined before each output projection.

    PYTHONPATH=. python experiments/l2_prefetch_probe.py --points 1x131072,4x32768,1x32768 --budgets 0.1,1.0 \\
        --out results/bench/l2_prefetch_probe_h200.json

Answer on an H200 (2026-11-22): no. The prefetch made every layer slower by about the time it takes to read `W_o`
once (31.6 → 39.1 µs per layer at (1, 128K), 21.5 → 28.7 at (1, 32K), budget 0.1; 146.7 → 160.6 at (1, 128K),
budget 1.0), joined at the end or before each projection alike: the read did not overlap the attention, nor did
the projection find the weights in L2. Not taken into the step. (That run timed each graph with CUDA events around
single replays, a timer of the probe's own; the probe now uses bench_decode's `graph_ms`.)
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from experiments.decode_kernel_sweep import HQ, LAYERS, D, Step, sweep_forms
from vlcache.kernels.decode_attention import decode_attention
from vlcache.kernels.linear import decode_linear


@triton.jit
def _prefetch_kernel(w_ptr, n, sink_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(w_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    s = tl.sum(x.to(tl.float32), 0)
    tl.store(sink_ptr + tl.program_id(0), s, mask=s == 12345.678)  # keeps the load; never written in practice


def prefetch(w: torch.Tensor, sink: torch.Tensor, block: int = 8192) -> None:
    n = w.numel()
    _prefetch_kernel[(triton.cdiv(n, block),)](w, n, sink, BLOCK=block, num_warps=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x131072,4x32768")
    ap.add_argument("--budgets", default="0.1,1.0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "l2_prefetch_probe.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    w_o = [torch.randn(HQ * D, HQ * D, device=dev, dtype=torch.bfloat16) * 0.01 for _ in range(LAYERS)]
    sink = torch.zeros(1 << 16, device=dev)

    def forms_for(batch: int, q: torch.Tensor, lay: list) -> tuple[dict[str, Step], None]:
        """The three forms (the module docstring) over this point's layers; nothing to check (the prefetch only
        reads)."""
        side = torch.cuda.Stream()

        def plain() -> None:
            for (k, v, n), w in zip(lay, w_o):
                decode_linear(decode_attention(q, k, v, n).view(batch, -1), w)

        def fetched(join_each: bool) -> None:
            main_s = torch.cuda.current_stream()
            for (k, v, n), w in zip(lay, w_o):
                side.wait_stream(main_s)
                with torch.cuda.stream(side):
                    prefetch(w, sink)
                a = decode_attention(q, k, v, n)
                if join_each:
                    main_s.wait_stream(side)
                decode_linear(a.view(batch, -1), w)
            main_s.wait_stream(side)

        return {"plain": plain, "prefetch": lambda: fetched(False), "prefetch-join": lambda: fetched(True)}, None

    budgets = [float(b) for b in args.budgets.split(",")]
    rows = sweep_forms(args.points.split(","), budgets, args.rounds, dev, forms_for)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(dev), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
