"""Where a captured decode step's time goes: each kernel of the replayed CUDA graph, by part of the layer, and the
idle gaps between kernels.

Runs `decode_fast` (fused step, CUDA graph) on bench_decode's real-size model and synthetic caches under the torch
profiler, splits the kernel timeline into steps (each starts with the embedding's index-select kernel) and labels
every kernel by its place in the step: the two RMSNorms, q/k/v, the attention's split and combine launches, o,
gate/up (with SwiGLU where fused), SwiGLU, down, decode-rule kernels, the LM head and the rest. Per part: device
time per step (median over the steady-state steps); `gaps`: the step's span less its kernels' time, what the
launches between kernels cost.

    PYTHONPATH=. python experiments/step_timeline.py --points 1x131072,4x32768,64x2048 --budgets 0.1,1.0 \\
        --out results/bench/step_timeline_h200.json

results/bench/step_timeline_pre_h200.json (H200, 2026-11-22, `--points 64x2048,1x131072`) is a run on the norms
split between the projections with the merge launch at two warps per program (now one). The run before the split
(its JSON not written) had, per layer at (1, 128K), budget 0.1, the two norm launches at 2.17 and 2.19 µs and
the gaps at 3.40 µs (2.53 with the split norms, whose projections took 0.3-0.8 µs longer each), and the merge at
4.42 µs (2.60 with two-warp programs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from experiments.bench_decode import IMAGE_TOKEN, parse_points, real_size_adapter, synthetic_cache
from vlcache.engine.attention import ForwardContext
from vlcache.engine.fast_decode import decode_fast

GEMM_MARKS = ("nvjet", "gemm", "_linear_kernel", "cutlass", "sm90_xmma")


def label_step(names: list[str]) -> list[str]:
    """Each kernel's part of the step, from the order of the fused step's launches (vlcache/engine/fused_decode.py):
    four projections per layer (q/k/v before the attention; o, gate/up and down after it), the LM head last."""
    gemm_at = [i for i, n in enumerate(names) if any(m in n for m in GEMM_MARKS)]
    head = gemm_at[-1] if gemm_at else -1
    labels, after_attn, last = [], 3, "other"  # GEMMs since the last attention launch (3: q/k/v comes next)
    for i, n in enumerate(names):
        if "_split_kernel" in n:
            lab, after_attn = "attn_split", 0
        elif "_combine_kernel" in n:
            lab = "attn_combine"
        elif "splitKreduce" in n:
            lab = last
        elif i == head:
            lab = "head"
        elif i in gemm_at:
            lab = ("o", "gate_up", "down", "qkv")[min(after_attn, 3)]
            after_attn += 1
        elif "_rms_norm_kernel" in n:
            lab = "head_norm" if i > max(gemm_at[-2:-1] or [-1]) else ("norm_post" if last == "o" else "norm_in")
        elif "_silu_mul_kernel" in n:
            lab = "silu"
        elif any(m in n for m in ("_h2o", "_shift", "_save", "_fixed", "_oldest", "_rolling")):
            lab = "rule"
        else:
            lab = "other"
        if lab in ("o", "gate_up", "down", "qkv", "head"):
            last = lab
        labels.append(lab)
    return labels


def timeline(adapter, cfg, batch, prompt, budget, new_tokens, device) -> dict:
    cache, _ = synthetic_cache(cfg, batch, prompt, budget, device, seed=0)
    token = torch.randint(3, IMAGE_TOKEN, (batch,), device=device)
    positions = torch.full((batch,), prompt, dtype=torch.long, device=device)
    stats: dict = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_fast(adapter, cache, ForwardContext(cache=cache), token, positions, new_tokens, stop_at_eos=False,
                    stats=stats)  # fmt: skip
        torch.cuda.synchronize()
    if stats.get("mode") != "graph" or stats.get("step") != "fused":
        raise RuntimeError(f"not the fused step in a CUDA graph: {stats.get('mode')}, {stats.get('step')}")
    ev = sorted(
        ((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA),
    )
    # a step starts with the embedding: index_select at small batches, a gather kernel at larger ones
    starts = [i for i, (_, _, n) in enumerate(ev) if "indexSelect" in n or "vectorized_gather_kernel" in n]
    if len(starts) < new_tokens // 2 + 1:
        names = sorted({n[:80] for _, _, n in ev})
        raise RuntimeError(f"{len(starts)} step starts found among {len(ev)} kernels; kernel names: {names}")
    steps = []
    for a, b in zip(starts[-new_tokens // 2 - 1 : -1], starts[-new_tokens // 2 :]):  # the later, replayed steps
        part = ev[a:b]
        labels = label_step([n for _, _, n in part])
        span = ev[b][0] - part[0][0]
        busy: dict[str, float] = {}
        for (s, e, _), lab in zip(part, labels):
            busy[lab] = busy.get(lab, 0.0) + (e - s)
        busy["gaps"] = span - sum(busy.values())
        busy["step"] = span
        steps.append(dict(kernels=len(part), us=busy))
    if len({s["kernels"] for s in steps}) != 1:
        raise RuntimeError(f"steps of {sorted({s['kernels'] for s in steps})} kernels: misplaced starts")
    parts = sorted({k for s in steps for k in s["us"]})
    med = {k: statistics.median(s["us"].get(k, 0.0) for s in steps) for k in parts}
    return dict(batch=batch, prompt_len=prompt, budget=budget, steps=len(steps), kernels=steps[-1]["kernels"],
                us_per_step=med, loop_ms_per_token=stats["loop_ms"] / max(stats["loop_steps"], 1))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x131072,4x32768,64x2048")
    ap.add_argument("--budgets", default="0.1,1.0")
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "step_timeline.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    points = parse_points(args.points)
    cfg, adapter = real_size_adapter(points, args.new_tokens, device)
    rows = []
    for batch, prompt in points:
        for budget in (float(b) for b in args.budgets.split(",")):
            timeline(adapter, cfg, batch, prompt, budget, 8, device)  # compiles this point's kernels
            row = timeline(adapter, cfg, batch, prompt, budget, args.new_tokens, device)
            rows.append(row)
            us = row["us_per_step"]
            print(f"B={batch} P={prompt} budget {budget}: step {us['step'] / 1e3:.3f} ms (loop "
                  f"{row['loop_ms_per_token']:.3f}), {row['kernels']} kernels", flush=True)  # fmt: skip
            for k, v in sorted(us.items(), key=lambda kv: -kv[1]):
                if k != "step":
                    print(f"    {k:13s} {v / 1e3:7.3f} ms  {v / 32:7.2f} us/layer", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
