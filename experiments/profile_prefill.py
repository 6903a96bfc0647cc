"""Where prefill time goes with a compressing preset: kernel totals of `prefill_and_compress` under two presets at
one (batch, prompt) point, side by side (the real-size model of bench_decode.py, random bf16 weights).

Usage: PYTHONPATH=. python experiments/profile_prefill.py [--point 4x32768] [--presets streamingllm,vlcache]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import bench_decode as bd  # noqa: E402

from vlcache.engine.generate import prefill_and_compress  # noqa: E402
from vlcache.policies.policy import build_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--point", default="4x32768")
    ap.add_argument("--presets", default="streamingllm,vlcache")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    batch, prompt = (int(x) for x in args.point.split("x"))
    device = torch.device("cuda")
    cfg = bd.model_config(False, prompt + 256)
    adapter = bd.TextAdapter(bd.build_model(cfg, device), device)
    inputs = bd.make_inputs(batch, prompt, device)
    for name in args.presets.split(","):
        with torch.inference_mode():
            prefill_and_compress(adapter, build_policy(bd.PRESETS[name], 0.1), inputs)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                pre = prefill_and_compress(adapter, build_policy(bd.PRESETS[name], 0.1), inputs)
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        by: dict[str, list[float]] = {}
        for e in kernels:
            by.setdefault(e.name[:110], []).append(e.time_range.elapsed_us())
        total = sum(sum(v) for v in by.values()) / 1e3
        print(f"{name}: wall {wall:.0f} ms (profiled), prefill {pre.prefill_ms:.0f} ms, compress {pre.compress_ms:.0f}"
              f" ms, {len(kernels)} kernels, {total:.0f} ms of kernel time")
        for k, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
            print(f"  {sum(v) / 1e3:9.1f} ms {len(v):6d}x  {k}")
        cpu = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
        print("  CPU ops by self time:")
        for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"  {e.self_cpu_time_total / 1e3:9.1f} ms {e.count:6d}x  {e.key[:80]}")
        del pre


if __name__ == "__main__":
    main()
