"""Decode benchmark of the fast GPU path (bench.md): LLaVA-1.6-Mistral-7B's language model at real size.

The language model is built from its config with random bf16 weights (nothing downloaded): 32 layers, hidden
4096, 32 query heads, 8 KV heads, head dim 128, MLP 14336, vocab 32064. Image tokens do not change the cost of
a decode step, so the model is text-only; prompts still carry an image-token span (id 32000) followed by a
50-token question, so VL-Cache's post-vision window is the paper's.

For each (batch, prompt length) point it times, side by side:

* ``transformers``: plain ``model.generate`` with SDPA and the full ``DynamicCache`` (prefill = a 1-token
  generate, decode ms/token = (N-token generate - 1-token generate) / (N - 1));
* ``fast full``: ``generate_fast`` with the ``full`` policy (prefill on SDPA, CUDA-graph decode, Triton decode
  attention over the reserved cache);
* ``fast synthetic@b``: ``decode_fast`` on a cache filled directly with random keys and values of a ragged
  compressed shape (per-layer budgets around ``b``, per-head and per-sequence variation): decode cost alone;
* ``fast <policy>@b``: ``generate_fast`` end to end through a compressing policy (``--policies``).

Decode ms/token of the fast path is the steady state (the replayed steps, synchronised host clock); its e2e
includes prefill, compression, reserve, the warm-up step and the capture. Medians over ``--repeats``.
Floor = (weight bytes + live KV bytes, prompt entries kept + half the generated ones) / measured
device-to-device copy bandwidth (bytes read + written).

Prints one table and writes JSON rows to ``--out`` (default ``$OUT/bench_decode.json``). Imports only torch,
transformers, triton and vlcache. ``--tiny`` runs a 2-layer model (on the CPU too) to check the script.

Usage: python experiments/bench_decode.py [--points 1x2048,1x32768] [--new-tokens 100] [--repeats 3]
       [--policies streamingllm,vlcache] [--kernel-sweep] [--profile] [--tiny] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import MistralConfig, MistralForCausalLM

from vlcache.cache import CompressedCache
from vlcache.engine.attention import ForwardContext, use_vlcache_attention
from vlcache.engine.fast_decode import decode_fast, generate_fast
from vlcache.engine.fused_decode import FusedDecoder
from vlcache.engine.generate import generate
from vlcache.kernels.decode_attention import DEFAULT_CONFIG, DecodeConfig, decode_attention
from vlcache.models.adapter import LlavaAdapter
from vlcache.policies.policy import build_policy

IMAGE_TOKEN = 32000
QUESTION = 50  # post-vision tokens (VL-Cache's scoring window in the paper's speed runs)
TEXT_PREFIX = 16

PRESETS = json.loads((Path(__file__).with_name("real_size_presets.json")).read_text())  # conf/policy, resolved
# VL-Cache's scoring window in the paper's speed runs: the last 50 prompt tokens (the question here)
PRESETS["vlcache"]["scorer"]["fallback_window"] = QUESTION


class TextAdapter(LlavaAdapter):
    """`LlavaAdapter`'s prefill/decode on a text-only causal LM (image tokens: plain vocabulary ids)."""

    def __init__(self, model, device) -> None:  # noqa: D107  (no processor: inputs are built here)
        self.model, self.processor, self.device = model, None, torch.device(device)
        self.text_config = model.config
        use_vlcache_attention(self.text_config)
        self.image_token_id = IMAGE_TOKEN
        self.eos_token_id, self.pad_token_id = 2, 0


def model_config(tiny: bool, max_positions: int) -> MistralConfig:
    if tiny:
        sizes = dict(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
        )
    else:
        sizes = dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
        )
    return MistralConfig(
        vocab_size=32064,
        max_position_embeddings=max_positions,
        rope_theta=1e6,
        sliding_window=None,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **sizes,
    )


def build_model(cfg: MistralConfig, device: torch.device, dtype=torch.bfloat16) -> MistralForCausalLM:
    """Random weights, made on the device (normal(0, 0.02) matrices, unit norms: never zeros)."""
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(saved)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)
    return model.eval()


def parse_points(spec: str) -> list[tuple[int, int]]:
    """``"1x2048,64x2048"`` as ``[(1, 2048), (64, 2048)]``: (batch, prompt length) points."""
    return [tuple(int(x) for x in p.split("x")) for p in spec.split(",") if p]


def real_size_adapter(points, new_tokens: int, device: torch.device) -> tuple[MistralConfig, TextAdapter]:
    """The real-size model (random weights) with room for the longest point's prompt and `new_tokens`, behind
    `TextAdapter`: what the GPU experiments time."""
    cfg = model_config(False, max(32768, max(p for _, p in points) + new_tokens + 8))
    return cfg, TextAdapter(build_model(cfg, device), device)


def prefill_attention_used(device: torch.device) -> str:
    """What the framework's prefill attention runs here at the benchmark's shapes (`prefill_attention=auto`):
    FlashAttention-4 where installed and able (vlcache/engine/prefill_attention.py), else SDPA."""
    from vlcache.engine.prefill_attention import fa4_unusable

    probe = torch.empty(1, 1, 2, 128, device=device, dtype=torch.bfloat16)
    return "sdpa" if fa4_unusable(probe, probe, None) else "fa4"


def measure_copy_bw(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of 20 after warm-up."""
    n = (1 << 29) if device.type == "cuda" else (1 << 24)
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    times = []
    for i in range(25):
        t0 = now(device)
        y.copy_(x)
        if i >= 5:
            times.append(now(device) - t0)
    return 2 * n * 2 / (statistics.median(times) * 1e-3)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() * 1e3


def make_inputs(batch: int, prompt: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """`[B, P]` ids: a text prefix, an image-token span, a 50-token question (all real tokens, no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_TOKEN, (batch, prompt), generator=g)
    ids[:, 0] = 1
    image_end = max(prompt - QUESTION, TEXT_PREFIX + 1)
    ids[:, TEXT_PREFIX:image_end] = IMAGE_TOKEN
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones(batch, prompt, dtype=torch.long, device=device),
    }


def kv_entry_bytes(cfg: MistralConfig) -> int:
    """Bytes of one token's keys and values over all layers and KV heads (bf16)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# -- the runs ------------------------------------------------------------------------------------------------
def run_transformers(model, inputs, new_tokens, repeats, device) -> dict:
    cfg = model.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "sdpa"
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)
    try:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=2, **kw)  # warm-up
            t1s, tns, peaks = [], [], []
            for _ in range(repeats):
                t0 = now(device)
                model.generate(**inputs, max_new_tokens=1, **kw)
                t1s.append(now(device) - t0)
                peak_reset(device)
                t0 = now(device)
                out = model.generate(**inputs, max_new_tokens=new_tokens, **kw)
                tns.append(now(device) - t0)
                peaks.append(peak(device))
                assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    finally:
        cfg._attn_implementation = saved
    t1, tn = statistics.median(t1s), statistics.median(tns)
    return dict(
        prefill_ms=t1,
        decode_ms_per_token=(tn - t1) / max(new_tokens - 1, 1),
        e2e_ms=tn,
        peak_gpu_bytes=peaks[-1],
        mode="eager",
    )


WARMED: set = set()


def first_diffs(ref: list[list[int]], out: list[list[int]]) -> list[int | None]:
    """Per sequence, the first step where `out`'s greedy token differs from `ref`'s (None: none differs)."""
    return [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), None) for r, o in zip(ref, out)]


def run_fast(adapter, name, budget, inputs, new_tokens, repeats, device, fused=None, check=False) -> dict:
    """`generate_fast` end to end (graph-safe per-token rules inside the captured step), after one untimed run per
    preset and point at the point's own size (kernels compiled, and the caching allocator grown to the preset's
    buffers: session 3 timed the presets of the large points from one run each, which included that growth). The
    untimed run generates as many tokens as the timed ones: with 4, the reserved capacities differed, and a
    capacity that Triton specialises differently (a multiple of 16 or not) compiled kernels inside a timed run's
    setup (Elastic's and H2O's 0.9-1.1 s setups at (1, 2K) on 2026-11-22; PyramidKV's 0.9 s at (4, 32K) before);
    `check`: also the simple loop (`generate`), and whether its greedy tokens equal the fast path's."""
    kw = dict(stop_at_eos=False, graph_safe_rules=True, fused=fused)
    shape = tuple(inputs["input_ids"].shape)
    if (name, fused, shape) not in WARMED:  # as many tokens as timed: the same capacities, so the same
        generate_fast(adapter, build_policy(PRESETS[name], budget), inputs, new_tokens, **kw)  # specialisations
        WARMED.add((name, fused, shape))
    rows = []
    for _ in range(repeats):
        stats = {}
        peak_reset(device)
        out = generate_fast(adapter, build_policy(PRESETS[name], budget), inputs, new_tokens, stats=stats, **kw)
        rows.append(
            dict(
                prefill_ms=out.prefill_ms,
                compress_ms=out.compress_ms,
                decode_ms_per_token=stats["loop_ms"] / max(stats["loop_steps"], 1),
                setup_ms=stats["setup_ms"],
                e2e_ms=out.e2e_ms,
                kv_bytes=out.kv_bytes_kept,
                kv_bytes_allocated=out.kv_bytes_allocated,
                kv_bytes_full=out.kv_bytes_full,
                kv_bytes_reserved=stats["kv_bytes_reserved"],
                kv_bytes_prompt_storage=stats["kv_bytes_prompt_storage"],
                layout=stats["layout"],
                peak_gpu_bytes=out.peak_gpu_bytes,
                mode=stats["mode"],
                reason=stats["reason"],
                step=stats["step"],
                rule_update=stats["rule_update"],
                realised_budget=out.report.realised_budget,
            )
        )
    res = _median_rows(rows)
    if check:
        ref = generate(adapter, build_policy(PRESETS[name], budget), inputs, new_tokens)  # cut at EOS, as out
        res["tokens_equal_simple"] = ref.tokens == out.tokens
        diffs = [i for i in first_diffs(ref.tokens, out.tokens) if i is not None]
        res["first_diff_step"] = min(diffs, default=None)
    return res


def synthetic_cache(cfg, batch, prompt, budget, device, seed=0) -> tuple[CompressedCache, int]:
    """A compressed cache filled directly: per-layer budgets from 1.6·b (first layer) to 0.4·b (last), ±25%
    per KV head, ±10% per sequence; random keys and values. Returns it and the number of entries kept."""
    g = torch.Generator().manual_seed(seed)
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    layer_f = torch.linspace(1.6, 0.4, L) if L > 1 else torch.ones(1)
    cache = CompressedCache(L)
    kept = 0
    for li, layer in enumerate(cache.layers):
        f = layer_f[li] * (1 + 0.25 * (2 * torch.rand(batch, H, generator=g) - 1))
        f = f * (1 + 0.1 * (2 * torch.rand(batch, 1, generator=g) - 1))
        counts = (budget * prompt * f).round().long().clamp(1, prompt)
        cap = int(counts.max())
        k = torch.randn(batch, H, cap, D, device=device, dtype=torch.bfloat16)
        v = torch.randn(batch, H, cap, D, device=device, dtype=torch.bfloat16)
        layer.update(k, v)
        layer.length = counts.to(device)
        layer.positions = torch.where(
            torch.arange(cap, device=device) < layer.length[..., None], layer.positions, -1
        )
        layer.seen = prompt
        layer.compressed = True
        kept += int(counts.sum())
    return cache, kept


def run_synthetic(adapter, cfg, batch, prompt, budget, new_tokens, repeats, device, fused=None) -> dict:
    rows = []
    for r in range(repeats + 1):  # the first is a warm-up
        peak_reset(device)
        cache, kept = synthetic_cache(cfg, batch, prompt, budget, device, seed=r)
        ctx = ForwardContext(cache=cache)
        token = torch.randint(3, IMAGE_TOKEN, (batch,), device=device)
        positions = torch.full((batch,), prompt, dtype=torch.long, device=device)
        stats = {}
        t0 = now(device)
        _, _, t_end = decode_fast(
            adapter, cache, ctx, token, positions, new_tokens, t_start=t0, stop_at_eos=False, stats=stats, fused=fused
        )
        if r:
            rows.append(
                dict(
                    prefill_ms=0.0,
                    decode_ms_per_token=stats["loop_ms"] / max(stats["loop_steps"], 1),
                    setup_ms=stats["setup_ms"],
                    e2e_ms=t_end - t0,
                    kv_bytes=kept * kv_entry_bytes(cfg) // (cfg.num_hidden_layers * cfg.num_key_value_heads),
                    kv_bytes_reserved=stats["kv_bytes_reserved"],
                    kv_bytes_prompt_storage=stats["kv_bytes_prompt_storage"],
                    layout=stats["layout"],
                    peak_gpu_bytes=peak(device),
                    mode=stats["mode"],
                    reason=stats["reason"],
                    step=stats["step"],
                    realised_budget=kept / (batch * prompt * cfg.num_hidden_layers * cfg.num_key_value_heads),
                )
            )
        del cache, ctx
    return _median_rows(rows)


def token_check(adapter, points, names, budget, new_tokens, device) -> list[dict]:
    """Greedy tokens of the fast path (fused step, CUDA graph, graph-safe rules) against the simple loop's, for
    `full` and each preset, on the adapter's model (its dtype decides how often rounding alone flips a near-tie)."""
    out = []
    dtype = str(next(adapter.model.parameters()).dtype).replace("torch.", "")
    for batch, prompt in points:
        inputs = make_inputs(batch, prompt, device)
        for name in ["full", *names]:
            b = 1.0 if name == "full" else budget
            ref = generate(adapter, build_policy(PRESETS[name], b), inputs, new_tokens)
            stats = {}
            got = generate_fast(adapter, build_policy(PRESETS[name], b), inputs, new_tokens, stats=stats,
                                graph_safe_rules=True)
            diffs = first_diffs(ref.tokens, got.tokens)
            row = dict(batch=batch, prompt_len=prompt, policy=name, budget=b, dtype=dtype, new_tokens=new_tokens,
                       equal=ref.tokens == got.tokens, first_diff=diffs, step=stats["step"],
                       mode=stats["mode"], rule_update=stats["rule_update"])
            out.append(row)
            print(f"  tokens {dtype} B={batch} P={prompt} {name:<12} equal={row['equal']} first diff {diffs} "
                  f"({stats['step']}, {stats['mode']})", flush=True)
        del inputs
    return out


def _median_rows(rows: list[dict]) -> dict:
    out = {}
    for key, val in rows[0].items():
        vals = [r[key] for r in rows]
        out[key] = statistics.median(vals) if isinstance(val, float) and None not in vals else vals[-1]
    return out


# -- the decode kernel alone ---------------------------------------------------------------------------------
def kernel_bench(cfg, points, budget, bw, device, sweep: bool) -> list[dict]:
    """decode_attention alone (one layer) at each point's full and compressed cache: graph-replay time, GB/s,
    error against the PyTorch fallback in float32."""
    H, D, Hq = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    configs = [DEFAULT_CONFIG]
    if sweep:
        configs += [
            dataclasses.replace(DEFAULT_CONFIG, block_n=bn, num_warps=w, num_stages=s)
            for bn in (32, 64, 128)
            for w in (4, 8)
            for s in (2, 3)
            if (bn, w, s) != (DEFAULT_CONFIG.block_n, DEFAULT_CONFIG.num_warps, DEFAULT_CONFIG.num_stages)
        ]
        configs += [dataclasses.replace(DEFAULT_CONFIG, waves=wv) for wv in (1, 2, 8)]
        configs += [dataclasses.replace(DEFAULT_CONFIG, min_keys_per_split=mk, waves=wv)
                    for mk in (32, 64, 256, 512, 1024, 2048) for wv in (2, 4)]
        configs += [dataclasses.replace(DEFAULT_CONFIG, block_n=128, num_warps=8, num_stages=3, waves=wv)
                    for wv in (2, 8)]
    rows = []
    for batch, prompt in points:
        for frac in (1.0, budget):
            n = max(1, round(frac * prompt))
            cap = n + 100
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(batch, Hq, 1, D, device=device, dtype=torch.bfloat16, generator=g)
            k = torch.randn(batch, H, cap, D, device=device, dtype=torch.bfloat16, generator=g)
            v = torch.randn(batch, H, cap, D, device=device, dtype=torch.bfloat16, generator=g)
            length = (n * (1 + 0.25 * (2 * torch.rand(batch, H, device=device, generator=g) - 1))).long()
            length = length.clamp(1, cap)
            ref = decode_attention(q.float(), k.float(), v.float(), length, backend="torch")
            nbytes = 2 * int(length.sum()) * D * 2
            for c in configs:
                c: DecodeConfig
                try:
                    out = decode_attention(q, k, v, length, config=c)
                    err = float((out.float() - ref).norm() / ref.norm())
                    ms = graph_ms(
                        lambda c=c, q=q, k=k, v=v, length=length: decode_attention(q, k, v, length, config=c)
                    )
                except Exception as e:  # noqa: BLE001  (a config that does not compile is reported, not fatal)
                    rows.append(
                        dict(
                            batch=batch,
                            prompt_len=prompt,
                            frac=frac,
                            config=dataclasses.asdict(c),
                            error=str(e)[:200],
                        )
                    )
                    continue
                rows.append(
                    dict(
                        batch=batch,
                        prompt_len=prompt,
                        frac=frac,
                        config=dataclasses.asdict(c),
                        us=ms * 1e3,
                        bytes=nbytes,
                        gbps=nbytes / (ms * 1e-3) / 1e9,
                        frac_of_copy_bw=nbytes / (ms * 1e-3) / bw,
                        rel_err=err,
                    )
                )
    return rows


def graph_ms(fn) -> float:
    """Median device time of one call replayed from a CUDA graph (no Python launch overhead: the small calls
    of decoding are launch-bound when timed from the host)."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=50, return_mode="median")
    del g
    return ms


def profile_step(adapter, cfg, batch, prompt, budget, device, path, fused=True) -> list[str]:
    """Kernel times of one eager decode step on a synthetic compressed cache (where the step time goes)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cache, _ = synthetic_cache(cfg, batch, prompt, budget, device)
    for layer in cache.layers:
        layer.reserve(layer.capacity + 8)
    ctx = ForwardContext(cache=cache, fast_decode=True)
    from vlcache.engine.attention import forward_context

    token = torch.randint(3, IMAGE_TOKEN, (batch,), device=device)
    pos = torch.full((batch,), prompt, dtype=torch.long, device=device)
    if fused:  # the step decode_fast runs: the fused one where the model supports it
        decoder, seen = FusedDecoder(adapter.model), cache.share_seen()
        step = lambda p: decoder(token, p[:, None], cache, seen.add_(1))  # noqa: E731
    else:
        step = lambda p: adapter.decode(token, p, cache)  # noqa: E731
    with torch.inference_mode(), forward_context(ctx):
        step(pos)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step(pos + 1)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    total_us = sum(e.time_range.elapsed_us() for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    with open(path, "w") as f:
        f.write(f"{len(kernels)} kernels, {total_us / 1e3:.3f} ms\n")
        for name, ts in top:
            f.write(f"{sum(ts):10.1f} us {len(ts):5d}x  {name[:150]}\n")
    return [
        f"profile (1 eager {'fused' if fused else 'module'} step, B={batch}, P={prompt}, synthetic@{budget}): "
        f"{len(kernels)} kernel launches, "
        f"{total_us / 1e3:.2f} ms of kernel time; by kernel in {os.path.basename(path)}"
    ]


# -- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x2048,1x32768", help="comma-separated BATCHxPROMPT")
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument(
        "--policies", default="all", help="end-to-end compressing presets, comma-separated ('all': every one; '' none)"
    )
    ap.add_argument("--fused", choices=("auto", "off"), default="auto", help="off: the model's own modules per step")
    ap.add_argument("--module-step", action="store_true", help="also time full and synthetic with the module step")
    ap.add_argument("--check-tokens", default="", help="points (BxP,...) where each policy's tokens are compared "
                    "with the simple loop's")
    ap.add_argument("--rule-cost", action="store_true",
                    help="also run the per-token presets (h2o, elastic) with the append rule: the rule's step cost")
    ap.add_argument("--check-fp32", default="", help="points where, after the timings, a float32 copy of the model "
                    "compares every preset's fast-path tokens with the simple loop's")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--step-configs", action="store_true", help="only the decode-attention configs: the kernel "
                    "sweep, then the synthetic decode step under each config with min_keys_per_split and waves varied")
    ap.add_argument("--kernel-sweep", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, to check the script (CPU works)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_decode.json"))
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    points = parse_points(args.points)
    check_points = {tuple(int(x) for x in p.split("x")) for p in args.check_tokens.split(",") if p}
    fused = None if args.fused == "auto" else False
    names = [p for p in args.policies.split(",") if p]
    if args.policies == "all":
        names = [n for n in PRESETS if n != "full"]
    n_new = args.new_tokens
    cfg = model_config(args.tiny, max(32768, max(p for _, p in points) + n_new + 8))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {dev_name}; torch {torch.__version__}, transformers {transformers.__version__}", flush=True
    )

    bw = measure_copy_bw(device)
    t0 = time.perf_counter()
    model = build_model(cfg, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"copy bandwidth {bw / 1e9:.0f} GB/s; model built in {time.perf_counter() - t0:.1f} s, "
        f"weights {weight_bytes / 1e9:.2f} GB",
        flush=True,
    )
    adapter = TextAdapter(model, device)
    entry = kv_entry_bytes(cfg)
    meta = dict(
        device=dev_name,
        copy_bw_bytes_per_s=bw,
        weight_bytes=weight_bytes,
        new_tokens=n_new,
        torch=torch.__version__,
        transformers=transformers.__version__,
        prefill_attention=prefill_attention_used(device),
    )
    print(f"the framework's prefill attention: {meta['prefill_attention']}", flush=True)

    def floor_ms(kv_bytes: int, batch: int) -> float:
        live = kv_bytes + batch * entry * n_new / 2  # the prompt's kept entries + half the generated ones
        return (weight_bytes + live) / bw * 1e3

    rows: list[dict] = []
    extra: dict = {"meta": meta}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, **extra}, f, indent=1)

    def add(batch, prompt, path, policy, budget, res, baseline=False):
        kv = res.get("kv_bytes", batch * prompt * entry)
        row = dict(
            batch=batch,
            prompt_len=prompt,
            path=path,
            policy=policy,
            budget=budget,
            prefill_ms=res["prefill_ms"],
            decode_ms_per_token=res["decode_ms_per_token"],
            e2e_ms=res["e2e_ms"],
            kv_bytes=kv,
            peak_gpu_bytes=res.get("peak_gpu_bytes"),
            baseline=baseline,
            device=dev_name,
            floor_ms=floor_ms(kv, batch),
            **{
                k: v
                for k, v in res.items()
                if k not in ("prefill_ms", "decode_ms_per_token", "e2e_ms", "kv_bytes", "peak_gpu_bytes")
            },
        )
        row["ratio_to_floor"] = row["decode_ms_per_token"] / row["floor_ms"]
        rows.append(row)
        save()
        print(
            f"  {path:<24} {policy:<12} {budget:<5} prefill {row['prefill_ms']:9.1f} ms  decode "
            f"{row['decode_ms_per_token']:8.2f} ms/tok  e2e {row['e2e_ms']:9.1f} ms  "
            f"floor {row['floor_ms']:.2f}  mode {row.get('mode')}",
            flush=True,
        )

    if args.step_configs:
        import importlib

        da = importlib.import_module("vlcache.kernels.decode_attention")  # the module, not its function

        extra["kernel"] = kernel_bench(cfg, points, args.budget, bw, device, True)
        save()
        base = da.DEFAULT_CONFIG
        for batch, prompt in points:
            for mk in (128, 256, 512, 1024):
                for wv in (2, 4):
                    da.DEFAULT_CONFIG = dataclasses.replace(base, min_keys_per_split=mk, waves=wv)
                    for budget in (1.0, args.budget):
                        res = run_synthetic(adapter, cfg, batch, prompt, budget, n_new, args.repeats, device)
                        res["config"] = dataclasses.asdict(da.DEFAULT_CONFIG)
                        add(batch, prompt, f"synthetic mk{mk} w{wv}", "synthetic", budget, res)
        da.DEFAULT_CONFIG = base
        print(f"wrote {args.out}")
        return

    fp32_points = parse_points(args.check_fp32)
    if fp32_points:  # first, and freed before the timings
        print("tokens: fast path vs simple loop, float32 weights", flush=True)
        checker = TextAdapter(build_model(cfg, device, torch.float32), device)
        extra["token_check"] = token_check(checker, fp32_points, names, args.budget, n_new, device)
        save()
        del checker
        WARMED.clear()
        peak_reset(device)

    for batch, prompt in points:
        print(f"point B={batch} P={prompt}", flush=True)
        inputs = make_inputs(batch, prompt, device)
        if not args.skip_hf:
            try:
                add(
                    batch,
                    prompt,
                    "transformers",
                    "full",
                    1.0,
                    run_transformers(model, inputs, n_new, args.hf_repeats, device),
                    baseline=True,
                )
            except torch.OutOfMemoryError as e:
                print(f"  transformers: out of memory ({e})")
        check = (batch, prompt) in check_points
        add(batch, prompt, "fast", "full", 1.0,
            run_fast(adapter, "full", 1.0, inputs, n_new, args.repeats, device, fused, check))
        add(batch, prompt, "fast synthetic", "synthetic", args.budget,
            run_synthetic(adapter, cfg, batch, prompt, args.budget, n_new, args.repeats, device, fused))
        if args.module_step:
            add(batch, prompt, "fast modules", "full", 1.0,
                run_fast(adapter, "full", 1.0, inputs, n_new, args.repeats, device, False))
            add(batch, prompt, "fast modules synth", "synthetic", args.budget,
                run_synthetic(adapter, cfg, batch, prompt, args.budget, n_new, args.repeats, device, False))
        runs = [(n, n, PRESETS[n]) for n in names]
        if args.rule_cost:
            runs += [(f"{n}+append", n, {**PRESETS[n], "decode": {"name": "append"}}) for n in names
                     if PRESETS[n]["decode"]["name"] != "append"]
        for label, name, preset in runs:
            PRESETS[label] = preset
            try:
                add(batch, prompt, "fast", label, args.budget,
                    run_fast(adapter, label, args.budget, inputs, n_new, max(args.repeats - 1, 1), device, fused,
                             check and label == name))
            except Exception as e:  # noqa: BLE001  (a policy another engineer is still writing: report, go on)
                print(f"  fast {name}: failed: {type(e).__name__}: {e}", flush=True)
                extra.setdefault("failures", []).append(
                    dict(batch=batch, prompt_len=prompt, policy=name, error=f"{type(e).__name__}: {e}"[:500])
                )
        if args.profile and device.type == "cuda":
            path = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"profile_{batch}x{prompt}.txt")
            try:
                lines = profile_step(adapter, cfg, batch, prompt, args.budget, device, path, fused is None)
            except Exception as e:  # noqa: BLE001  (diagnostics only)
                lines = [f"profile failed: {type(e).__name__}: {e}"]
            extra.setdefault("profile", []).extend(lines)
            print("  " + lines[-1], flush=True)
        del inputs
        save()

    # -- the table -------------------------------------------------------------------------------------------
    ref = {(r["batch"], r["prompt_len"], r["path"], r["policy"]): r for r in rows}
    print(
        f"\ndevice {dev_name}; copy {bw / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.2f} GB; "
        f"{n_new} new tokens"
    )
    head = (
        f"{'B':>3} {'prompt':>6} {'path':<15} {'policy':<12} {'bud':>4} {'prefill':>8} {'dec ms/t':>8} "
        f"{'e2e ms':>8} {'KV MB':>8} {'peak GB':>7} {'floor':>6} {'x floor':>7} {'vs HF':>6} {'vs full':>7} "
        f"{'e2e vs HF':>9}"
    )
    print(head)
    for r in rows:
        hf = ref.get((r["batch"], r["prompt_len"], "transformers", "full"))
        full = ref.get((r["batch"], r["prompt_len"], "fast", "full"))
        vs_hf = hf["decode_ms_per_token"] / r["decode_ms_per_token"] if hf else float("nan")
        vs_full = full["decode_ms_per_token"] / r["decode_ms_per_token"] if full else float("nan")
        e2e_hf = hf["e2e_ms"] / r["e2e_ms"] if hf else float("nan")
        r.update(
            speedup_vs_transformers=vs_hf, speedup_vs_fast_full=vs_full, e2e_speedup_vs_transformers=e2e_hf
        )
        pk = r["peak_gpu_bytes"] / 1e9 if r["peak_gpu_bytes"] else float("nan")
        print(
            f"{r['batch']:>3} {r['prompt_len']:>6} {r['path']:<15} {r['policy']:<12} {r['budget']:>4} "
            f"{r['prefill_ms']:>8.1f} {r['decode_ms_per_token']:>8.2f} {r['e2e_ms']:>8.0f} "
            f"{r['kv_bytes'] / 1e6:>8.1f} {pk:>7.2f} {r['floor_ms']:>6.2f} {r['ratio_to_floor']:>7.2f} "
            f"{vs_hf:>6.2f} {vs_full:>7.2f} {e2e_hf:>9.2f}"
        )
    save()
    if device.type == "cuda":
        print("\ndecode attention kernel alone (one layer)", flush=True)
        extra["kernel"] = kernel_bench(cfg, points, args.budget, bw, device, args.kernel_sweep)
        save()

    for line in extra.get("profile", []):
        print(line)
    if extra.get("kernel"):
        print("decode attention alone (default config first; us, GB/s, fraction of copy bandwidth, rel err):")
        best = {}
        for k in extra["kernel"]:
            if "us" not in k:
                continue
            key = (k["batch"], k["prompt_len"], k["frac"])
            if k["config"] == dataclasses.asdict(DEFAULT_CONFIG):
                print(
                    f"  B={key[0]} P={key[1]} frac={key[2]}: {k['us']:.1f} us  {k['gbps']:.0f} GB/s  "
                    f"{k['frac_of_copy_bw']:.2f}  err {k['rel_err']:.1e}"
                )
            if key not in best or k["us"] < best[key]["us"]:
                best[key] = k
        if args.kernel_sweep:
            for key, k in best.items():
                c = k["config"]
                print(
                    f"  best B={key[0]} P={key[1]} frac={key[2]}: {k['us']:.1f} us "
                    f"({k['frac_of_copy_bw']:.2f}) block_n={c['block_n']} warps={c['num_warps']} "
                    f"stages={c['num_stages']} waves={c['waves']}"
                )
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
