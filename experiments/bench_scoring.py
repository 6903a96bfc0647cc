"""Benchmark of the scoring core (bench.md, last target row) against plain PyTorch.

Shapes: LLaVA-1.6-Mistral-7B attention heads (Hq 32, Hkv 8, D 128, bf16) at
  * VL-Cache post-vision scoring: last 50 rows over 32K keys, batch 1, relative threshold;
  * H2O accumulated attention: all 4K rows (causal) over 4K keys, batch 1;
  * SnapKV window: last 32 rows over 2K keys, batch 64, with left padding.

"Plain PyTorch" materialises the float32 softmax of q·kᵀ (bf16 tensor-core matmul, then float),
masked causally and by padding, sums the columns and reduces over each GQA group; with a
threshold it also counts entries below p·rowmax. Both sides are checked against the float32
chunked fallback before timing. Floors: bytes (q + k read once, col written) over measured copy
bandwidth, and 2 passes × 2·D FLOPs per visible (row, key, head) over a measured bf16 matmul rate.

Imports only torch, triton and vlcache.kernels (GPU machines lack the experiment stack).
Also reported for our kernels: the time of a CUDA-graph replay of one call (device time alone,
without Python launch overhead), the host time per call, and the per-kernel device times. With
``--sweep`` each shape is also timed under variants of the tile configuration.

Usage: python experiments/bench_scoring.py [--out PATH] [--quick] [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable

import torch
import triton
import triton.testing

from vlcache.kernels import AttentionScores, attention_scores, attention_scores_torch
from vlcache.kernels.scores import _attention_scores_triton, _pick_config

HQ, HKV, D = 32, 8, 128


def plain_torch(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, key_valid: torch.Tensor | None,
    threshold: float | None,
) -> AttentionScores:
    """What one writes in PyTorch: full rows × keys float32 probabilities."""
    B, Hq, Nq, Dh = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Group query heads by KV head instead of repeating k (a stronger baseline than repeat_kv).
    logits = torch.matmul(q.reshape(B, Hkv, G * Nq, Dh), k.transpose(-1, -2)).float() * Dh**-0.5
    logits = logits.view(B, Hkv, G, Nq, Nk)
    mask = torch.arange(Nk, device=q.device).view(1, 1, Nk) <= q_pos.unsqueeze(-1)  # [B, Nq, Nk]
    if key_valid is not None:
        mask = mask & key_valid.unsqueeze(1)
    mask = mask.view(B, 1, 1, Nq, Nk)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num_(0.0)
    col = probs.sum(dim=(2, 3))
    if threshold is None:
        return AttentionScores(col=col)
    pmax = probs.amax(dim=-1, keepdim=True)
    below = ((probs < threshold * pmax) & mask).sum(dim=(3, 4)).reshape(B, Hq)
    visible = mask.sum(dim=(3, 4)).expand(B, Hkv, G).reshape(B, Hq)
    return AttentionScores(col=col, below=below, visible=visible)


def measure_copy_bw() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    n = 1 << 29  # 1 GiB of bf16
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * n * 2 / (ms * 1e-3)


def measure_matmul_rate() -> float:
    """bf16 matmul rate (FLOP/s) on random data, 8192³."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak memory above what was allocated before the call (outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def graph_ms(fn: Callable[[], object]) -> float:
    """Median device time of one call replayed from a CUDA graph (no Python launch overhead)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=200, return_mode="median")
    del g
    return ms


def host_us(fn: Callable[[], object], n: int = 50) -> float:
    """Host (Python + launch) time per call, without waiting for the device."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def kernel_breakdown(fn: Callable[[], object], n: int = 20) -> dict[str, float]:
    """Device ms per call of each kernel, from the PyTorch profiler."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
            if t and t > 0:
                out[e.key[:48]] = round(t / n / 1e3, 4)
        return out
    except Exception as exc:  # the profiler is diagnostics only
        return {"error": float("nan"), str(exc)[:60]: float("nan")}


def sweep(q, k, q_pos, kv, thr, ref_col) -> list[dict]:
    """Time variants of the tile configuration around the default one."""
    B, Hq, Nq, Dh = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    base = _pick_config(B, Hkv, G, Nq, Nk, Dh, q.device)
    var: list[tuple[str, dict]] = [("default", {})]
    var += [
        ("split1/2", dict(nsplit=max(1, base.nsplit // 2))),
        ("split1*2", dict(nsplit=base.nsplit * 2)),
        ("m1=64 w4", dict(block_m1=64, warps1=4)),
    ]
    if base.rows_stationary:
        var += [
            ("n2=32", dict(block_n2=32)),
            ("s2=2", dict(stages2=2)),
            ("split2/2", dict(nsplit2=max(1, base.nsplit2 // 2))),
            ("split2*2", dict(nsplit2=base.nsplit2 * 2)),
            ("key-stat", dict(rows_stationary=False, block_m2=min(64, triton.next_power_of_2(Nq)),
                              block_n2=64, warps2=4, stages2=2)),
        ]
    else:
        var += [
            ("m2=32", dict(block_m2=32)),
            ("n2=128", dict(block_n2=128)),
            ("s2=3", dict(stages2=3)),
            ("m2=128 w8", dict(block_m2=128, warps2=8)),
        ]
    rows = []
    for label, over in var:
        cfg = dataclasses.replace(base, **over)

        def fn(cfg=cfg):
            return _attention_scores_triton(q, k, q_pos, key_valid=kv, threshold=thr, config=cfg)

        try:
            err = rel_err(fn().col, ref_col)
            rows.append(dict(label=label, config=dataclasses.asdict(cfg), err=err, graph_ms=graph_ms(fn),
                             wall_ms=triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")))
        except Exception as exc:
            rows.append(dict(label=label, config=dataclasses.asdict(cfg), error=str(exc)[:200]))
        r = rows[-1]
        if "error" in r:
            print(f"    {label:12s} ERROR {r['error'][:100]}")
        else:
            print(f"    {label:12s} graph {r['graph_ms']:.4f} ms  wall {r['wall_ms']:.4f} ms  "
                  f"err {r['err']:.1e}")
    return rows


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def make_case(name: str, B: int, Nq: int, Nk: int, rows: str, pad: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, HQ, Nq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, HKV, Nk, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    if rows == "all":
        q_pos = torch.arange(Nk, device="cuda").expand(B, Nq).contiguous()
    else:
        q_pos = torch.arange(Nk - Nq, Nk, device="cuda").expand(B, Nq).contiguous()
    key_valid = None
    if pad:
        pads = torch.randint(0, pad + 1, (B,), device="cuda", generator=gen)
        key_valid = torch.arange(Nk, device="cuda").view(1, -1) >= pads.view(-1, 1)
    return q, k, q_pos, key_valid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.environ["OUT"], "bench_scoring.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out, help="JSON output path")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    ap.add_argument("--sweep", action="store_true", help="also time tile-configuration variants")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False

    dev_name = torch.cuda.get_device_name()
    bw = measure_copy_bw()
    rate = measure_matmul_rate()
    print(f"device: {dev_name}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s   bf16 matmul {rate / 1e12:.0f} TFLOP/s")

    scale_k = 8 if args.quick else 1
    cases = [
        # name, B, Nq, Nk, rows, left pad, threshold
        ("post-vision 50 rows x 32K, B=1, thr", 1, 50, 32768 // scale_k, "last", 0, 0.01),
        ("all rows 4K causal, B=1", 1, 4096 // scale_k, 4096 // scale_k, "all", 0, None),
        ("last 32 rows x 2K, B=64, left pad", 64 // scale_k, 32, 2048, "last", 256, None),
    ]
    results = []
    for i, (name, B, Nq, Nk, rows, pad, thr) in enumerate(cases):
        q, k, q_pos, kv = make_case(name, B, Nq, Nk, rows, pad, seed=1234 + i)

        def ours(q=q, k=k, q_pos=q_pos, kv=kv, thr=thr):
            return attention_scores(q, k, q_pos, key_valid=kv, threshold=thr)

        def plain(q=q, k=k, q_pos=q_pos, kv=kv, thr=thr):
            return plain_torch(q, k, q_pos, kv, thr)

        def fallback(q=q, k=k, q_pos=q_pos, kv=kv, thr=thr):
            return attention_scores_torch(q, k, q_pos, key_valid=kv, threshold=thr)

        # --- correctness first: against the float32 chunked fallback on the same inputs
        ref, o, p = fallback(), ours(), plain()
        torch.cuda.synchronize()
        err_ours = rel_err(o.col, ref.col)
        err_plain = rel_err(p.col, ref.col)
        cnt_diff = 0
        if thr is not None:
            assert torch.equal(o.visible, ref.visible), "visible counts differ"
            cnt_diff = int((o.below - ref.below).abs().max())
            cnt_rel = cnt_diff / max(1, int(ref.visible.max()))
            assert cnt_rel < 1e-4, f"below counts differ by {cnt_diff}"
        assert err_ours < 1e-3 and torch.isfinite(o.col).all(), f"{name}: col error {err_ours:.2e}"
        del ref, o, p

        # --- memory
        mem_ours = peak_extra_bytes(ours)
        mem_plain = peak_extra_bytes(plain)
        rowsxkeys = B * HQ * Nq * Nk * 4  # one float32 rows × keys buffer

        # --- time: median of do_bench twice each (the spread between the two runs is the noise)
        t_ours = [triton.testing.do_bench(ours, warmup=25, rep=200, return_mode="median") for _ in range(2)]
        t_plain = [triton.testing.do_bench(plain, warmup=10, rep=100, return_mode="median") for _ in range(2)]
        t_fb = triton.testing.do_bench(fallback, warmup=5, rep=50, return_mode="median")
        t_graph = graph_ms(ours)
        t_host = host_us(ours)
        kernels = kernel_breakdown(ours)
        print(f"[{name}] ours: graph {t_graph:.4f} ms, host {t_host:.0f} us/call, kernels {kernels}")
        sweep_rows = []
        if args.sweep:
            ref_col = fallback().col
            sweep_rows = sweep(q, k, q_pos, kv, thr, ref_col)
            del ref_col

        # --- floors
        pos_cpu = q_pos.cpu()
        j = torch.arange(Nk)
        vis = j.view(1, 1, -1) <= pos_cpu.unsqueeze(-1)
        if kv is not None:
            vis = vis & kv.cpu().unsqueeze(1)
        pairs = int(vis.sum()) * HQ  # visible (row, key, head) triples
        flops = 2 * 2 * D * pairs  # two passes, a multiply-add per dim
        nbytes = q.numel() * 2 + k.numel() * 2 + B * HKV * Nk * 4
        floor_ms = max(nbytes / bw, flops / rate) * 1e3
        tm = min(t_ours)
        res = dict(
            name=name, B=B, Hq=HQ, Hkv=HKV, D=D, Nq=Nq, Nk=Nk, threshold=thr, left_pad_max=pad,
            ours_ms=tm, ours_ms_runs=t_ours, plain_ms=min(t_plain), plain_ms_runs=t_plain,
            fallback_ms=t_fb, speedup=min(t_plain) / tm, floor_ms=floor_ms, floor_ratio=tm / floor_ms,
            bytes=nbytes, flops=flops, achieved_GBps=nbytes / (tm * 1e-3) / 1e9,
            achieved_TFLOPs=flops / (tm * 1e-3) / 1e12, ours_extra_MB=mem_ours / 2**20,
            plain_extra_MB=mem_plain / 2**20, rowsxkeys_fp32_MB=rowsxkeys / 2**20,
            col_rel_err_ours=err_ours, col_rel_err_plain=err_plain, below_max_abs_diff=cnt_diff,
            ours_graph_ms=t_graph, ours_host_us=t_host, kernels_ms=kernels, sweep=sweep_rows,
        )
        results.append(res)
        del q, k, q_pos, kv, ours, plain, fallback
        torch.cuda.empty_cache()

    hdr = (
        f"{'shape':38s} {'ours ms':>8s} {'torch ms':>9s} {'speedup':>8s} {'floor ms':>8s} {'x floor':>7s} "
        f"{'GB/s':>6s} {'TFLOP/s':>7s} {'ours MB':>8s} {'torch MB':>9s} {'RxK MB':>8s} {'fallbk ms':>9s} "
        f"{'graph ms':>8s} {'host us':>7s} {'col err':>8s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(
            f"{r['name']:38s} {r['ours_ms']:8.3f} {r['plain_ms']:9.3f} {r['speedup']:7.1f}x "
            f"{r['floor_ms']:8.3f} {r['floor_ratio']:7.1f} {r['achieved_GBps']:6.0f} "
            f"{r['achieved_TFLOPs']:7.1f} {r['ours_extra_MB']:8.1f} {r['plain_extra_MB']:9.0f} "
            f"{r['rowsxkeys_fp32_MB']:8.0f} {r['fallback_ms']:9.2f} {r['ours_graph_ms']:8.3f} "
            f"{r['ours_host_us']:7.0f} {r['col_rel_err_ours']:8.1e}"
        )
    out = dict(
        device=dev_name, torch=torch.__version__, triton=triton.__version__, copy_bw_GBps=bw / 1e9,
        bf16_matmul_TFLOPs=rate / 1e12,
        notes="floor FLOPs count visible (row,key,head) triples only: 2 passes x 2*D each; "
        "bytes = q + k read once + col written; times are do_bench medians (min of 2 runs)",
        cases=results,
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
