"""The fused decode step in one form against another, in one run.

``current`` is `FusedDecoder` as it is. The other forms swap functions of vlcache/engine/fused_decode.py back to
what the step ran before:

* ``norm-launch`` (until the RMSNorms were split between the projections' epilogues, 2026-11-22): the output and
  down projections, then `rms_norm`, two launches where `residual_norm_linear` is one;
* ``cublas-qkv-gu`` (until q/k/v and gate/up ran on Triton, 2026-11-21): that, with cuBLAS (`F.linear`) for q/k/v
  and gate/up, then `silu_mul`;
* ``narrow-only`` (until 17-64 rows ran on Triton, 2026-11-22): beyond 16 rows cuBLAS, `rms_norm` and `silu_mul`;
* ``wide-*``: the current step with one projection's 17-64-row launch config (`LinearConfig.wide`) replaced.

Each times bench_decode's real-size model on its synthetic caches (`decode_fast`, CUDA graph, steady state),
alternating for ``--rounds`` rounds, and checks whether the forms give the same tokens (bf16: the fold rounds
differently, so random weights' near-tied logits may part).

    PYTHONPATH=. python experiments/step_forms_ab.py --points 1x2048,4x32768,1x131072 --budgets 1.0,0.1 \\
        --forms norm-launch,current --out results/bench/step_forms_ab_norm_h200.json

results/bench/step_forms_ab_h200.json is the run of ``cublas-qkv-gu`` against what is now ``norm-launch``;
step_forms_ab_normloop_h200.json's ``current`` is a form not kept, the norm folded into the consumer's tile loads;
step_forms_ab_early_h200.json's ``current`` is another, the norm operands loaded before the K loop, against
``late-norm-loads``, the form kept (loads in the epilogue); in step_forms_ab_wide_h200.json (``--points 64x2048
--budgets 0.1,1.0 --rounds 2 --new-tokens 50``) ``current`` ran gate/up's 64-row tile at 128 of K, 4 stages, and
``wide-sw-bk64s4`` is what `SWIGLU_CONFIG.wide` is now.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

from experiments.bench_decode import IMAGE_TOKEN, parse_points, real_size_adapter, synthetic_cache
from vlcache.engine import fused_decode
from vlcache.engine.attention import ForwardContext
from vlcache.engine.fast_decode import decode_fast
from vlcache.kernels import linear
from vlcache.kernels.fused_ops import rms_norm, silu_mul
from vlcache.kernels.linear import LinearConfig, Normed, decode_linear


def _norm_launch(x, w, bias, residual, norm_w, eps, *, config=None):
    h, y = rms_norm(residual, norm_w, eps, residual=decode_linear(x, w, bias, config=config))
    return h, Normed(y, None, eps)


def _cublas(x, w, bias=None, *, swiglu=False, config=None):
    return silu_mul(F.linear(x.x, w, bias)) if swiglu else F.linear(x.x, w, bias)


CURRENT = {"residual_norm_linear": fused_decode.residual_norm_linear, "normed_linear": fused_decode.normed_linear}
FORMS = {
    "current": CURRENT,
    "norm-launch": {**CURRENT, "residual_norm_linear": _norm_launch},
    "cublas-qkv-gu": {"residual_norm_linear": _norm_launch, "normed_linear": _cublas},
}


# 17-64-row configs: (which config's `wide`, its replacement)
WIDE = {"swiglu": linear.SWIGLU_CONFIG, "default": linear.DEFAULT_CONFIG, "qkv": linear.QKV_CONFIG}
WIDE_NOW = {k: c.wide for k, c in WIDE.items()}
WIDE_FORMS = {
    "wide-sw-bk64s3": ("swiglu", LinearConfig(block_n=64, block_k=64, num_warps=4, num_stages=3)),
    "wide-sw-bk64s4": ("swiglu", LinearConfig(block_n=64, block_k=64, num_warps=4, num_stages=4)),
    "wide-sw-bk128s3": ("swiglu", LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=3)),
    "wide-dn-s4": ("default", LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=2)),
    "wide-qkv-s6": ("qkv", LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=6)),
}
MAX_ROWS_WIDE = linear.MAX_ROWS_WIDE


def _use(form: str) -> None:
    for name, fn in FORMS.get(form, CURRENT).items():
        setattr(fused_decode, name, fn)
    for k, c in WIDE.items():
        c.wide = WIDE_NOW[k]
    if form in WIDE_FORMS:
        which, cfg = WIDE_FORMS[form]
        WIDE[which].wide = cfg
    linear.MAX_ROWS_WIDE = linear.MAX_ROWS if form == "narrow-only" else MAX_ROWS_WIDE


def step_ms(adapter, cfg, batch, prompt, budget, new_tokens, device) -> tuple[float, list[list[int]]]:
    cache, _ = synthetic_cache(cfg, batch, prompt, budget, device, seed=0)
    torch.manual_seed(0)
    token = torch.randint(3, IMAGE_TOKEN, (batch,), device=device)
    positions = torch.full((batch,), prompt, dtype=torch.long, device=device)
    stats: dict = {}
    tokens, _, _ = decode_fast(
        adapter, cache, ForwardContext(cache=cache), token, positions, new_tokens, stop_at_eos=False, stats=stats
    )
    if stats.get("mode") != "graph" or stats.get("step") != "fused":
        raise RuntimeError(f"not the fused step in a CUDA graph: {stats.get('mode')}, {stats.get('step')}")
    return stats["loop_ms"] / max(stats["loop_steps"], 1), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x2048,4x32768")
    ap.add_argument("--budgets", default="1.0,0.1")
    ap.add_argument("--forms", default="norm-launch,current")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "step_forms_ab.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    points = parse_points(args.points)
    forms = args.forms.split(",")
    known = [*FORMS, *WIDE_FORMS, "narrow-only"]
    if any(f not in known for f in forms):
        ap.error(f"--forms {args.forms!r}: each one of {', '.join(known)}")
    cfg, adapter = real_size_adapter(points, args.new_tokens, device)
    rows = []
    for batch, prompt in points:
        for budget in (float(b) for b in args.budgets.split(",")):
            times: dict[str, list[float]] = {f: [] for f in forms}
            tokens = {}
            for r in range(args.rounds + 1):  # round 0 compiles and warms up every form
                for form in forms:
                    _use(form)
                    ms, tokens[form] = step_ms(adapter, cfg, batch, prompt, budget, args.new_tokens, device)
                    if r:
                        times[form].append(ms)
            _use("current")
            med = {f: statistics.median(t) for f, t in times.items()}
            same = {f: tokens[f] == tokens[forms[-1]] for f in forms[:-1]}
            rows.append(dict(batch=batch, prompt_len=prompt, budget=budget, ms=med, all=times, same_tokens=same))
            print(f"B={batch:<3} P={prompt:<6} budget {budget:<4} " + "  ".join(f"{f} {med[f]:6.3f}" for f in forms)
                  + f" ms/token; {forms[-1]}/{forms[0]} {med[forms[-1]] / med[forms[0]]:.3f}; same tokens {same}",
                  flush=True)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
