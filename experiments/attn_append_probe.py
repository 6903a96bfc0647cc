"""Probe: what the decode step's attention launch costs beyond the key loop at one point.

step_timeline.py has the step's attention at 21.8 µs per layer at (64, 2K), budget 0.1, where
decode_kernel_sweep.py times the bare kernel at 17.9. The step's launch differs from the sweep's in three ways:
the ragged layout (`bounds`), the fused RoPE and append (`rope_append_attention`), and the lengths (the sweep's
are the budget's share ±25%, the step's of a preset without a rule are all equal). Each form here is one CUDA
graph of 32 layers' own buffers (`graph_ms`):

* ``padded``: `decode_attention` over `[B, Hkv, cap, D]`, every row `n + 1` entries;
* ``ragged``: the same over the ragged layout the step uses (`bounds`, `max_cap`);
* ``append``: `rope_append_attention` as the step calls it, rows of capacity `n + 1` holding `n`, so the first
  replay fills them and every later one reads `n + 1` entries and drops its append, as full rows do;
* ``padded-jagged``: ``padded`` with lengths ±25%, the sweep's.

    PYTHONPATH=. python experiments/attn_append_probe.py --points 64x2048,4x32768 --out results/bench/x.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from experiments.bench_decode import measure_copy_bw, parse_points
from experiments.decode_kernel_sweep import HKV, HQ, LAYERS, D, time_rounds
from vlcache.kernels.decode_attention import decode_attention, rope_append_attention


def forms(batch: int, n: int, device: torch.device, jitter: float, gen: torch.Generator) -> dict:
    cap = n + 1
    bf = torch.bfloat16
    pads, rags = [], []
    for _ in range(LAYERS):
        k = torch.randn(batch, HKV, cap, D, device=device, dtype=bf, generator=gen)
        v = torch.randn(batch, HKV, cap, D, device=device, dtype=bf, generator=gen)
        full = torch.full((batch, HKV), cap, device=device, dtype=torch.long)
        jag = (n * (1 + jitter * (2 * torch.rand(batch, HKV, device=device, generator=gen) - 1))).long().clamp(1, cap)
        pads.append((k, v, full, jag))
        kr = k.transpose(0, 1).reshape(1, HKV, batch * cap, D).contiguous()
        vr = v.transpose(0, 1).reshape(1, HKV, batch * cap, D).contiguous()
        pos = torch.arange(batch * cap, device=device).view(1, 1, -1).repeat(1, HKV, 1)
        rags.append((kr, vr, full.clone(), torch.full_like(full, n), pos))
    bounds = torch.arange(batch + 1, device=device) * cap
    q = torch.randn(batch, HQ, 1, D, device=device, dtype=bf, generator=gen)
    qkv = torch.randn(batch, (HQ + 2 * HKV) * D, device=device, dtype=bf, generator=gen)
    ang = torch.rand(batch, D, device=device, generator=gen)
    cos, sin = ang.cos().to(bf), ang.sin().to(bf)
    seen = torch.tensor(n + 1, device=device)
    return {
        "padded": lambda: [decode_attention(q, k, v, ln) for k, v, ln, _ in pads],
        "ragged": lambda: [decode_attention(q, k, v, ln, bounds=bounds, max_cap=cap) for k, v, ln, _, _ in rags],
        "append": lambda: [
            rope_append_attention(qkv, cos, sin, k, v, ln, pos, seen, HQ, bounds=bounds, max_cap=cap)
            for k, v, _, ln, pos in rags
        ],
        "padded-jagged": lambda: [decode_attention(q, k, v, jag) for k, v, _, jag in pads],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="64x2048,4x32768,1x32768")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attn_append_probe.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = measure_copy_bw(device)
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for batch, prompt in parse_points(args.points):
        n = max(1, round(args.budget * prompt))
        fs = forms(batch, n, device, 0.25, gen)
        med, times = time_rounds(fs, args.rounds)
        floor_us = batch * HKV * (n + 1) * D * 2 * 2 / bw * 1e6
        rows.append(dict(point=f"{batch}x{prompt}", budget=args.budget, floor_us=floor_us, us_per_layer=med,
                         all=times))  # fmt: skip
        print(f"{batch}x{prompt}: floor {floor_us:.1f} us  " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()),
              flush=True)  # fmt: skip
        del fs
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(), copy_bw_bytes_per_s=bw, torch=torch.__version__)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
