"""The fused decode step's projections, this form against the previous one, in one run.

``after`` is `FusedDecoder` as it is: up to 16 sequences, q/k/v through `decode_linear` (`QKV_CONFIG`) and gate/up
through `swiglu_linear` (SwiGLU in the GEMM's epilogue). ``before`` swaps those two calls back to what the step ran
until 2026-11-21: cuBLAS (`F.linear`) for q/k/v and gate/up, then `silu_mul`. Both time bench_decode's real-size
model on its synthetic caches (`decode_fast`, CUDA graph, steady state), alternating for ``--rounds`` rounds, and
check that the two forms give the same tokens.

    PYTHONPATH=. python experiments/step_forms_ab.py --points 1x2048,4x32768 --budgets 1.0,0.1 \\
        --out results/bench/step_forms_ab_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F

from experiments.bench_decode import IMAGE_TOKEN, TextAdapter, build_model, model_config, synthetic_cache
from vlcache.engine import fused_decode
from vlcache.engine.attention import ForwardContext
from vlcache.engine.fast_decode import decode_fast
from vlcache.kernels.fused_ops import silu_mul
from vlcache.kernels.linear import QKV_CONFIG, decode_linear, swiglu_linear


def _before_linear(x, w, b=None, *, config=None):
    return F.linear(x, w, b) if config is QKV_CONFIG else decode_linear(x, w, b, config=config)


def _before_swiglu(x, w, b=None, *, config=None):
    return silu_mul(F.linear(x, w, b))


FORMS = {"before": (_before_linear, _before_swiglu), "after": (decode_linear, swiglu_linear)}


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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "step_forms_ab.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    cfg = model_config(False, max(32768, max(p for _, p in points) + args.new_tokens + 8))
    adapter = TextAdapter(build_model(cfg, device), device)
    rows = []
    for batch, prompt in points:
        for budget in (float(b) for b in args.budgets.split(",")):
            times: dict[str, list[float]] = {f: [] for f in FORMS}
            tokens = {}
            for r in range(args.rounds + 1):  # round 0 compiles and warms up both
                for form, (lin, swi) in FORMS.items():
                    fused_decode.decode_linear, fused_decode.swiglu_linear = lin, swi
                    ms, tokens[form] = step_ms(adapter, cfg, batch, prompt, budget, args.new_tokens, device)
                    if r:
                        times[form].append(ms)
            fused_decode.decode_linear, fused_decode.swiglu_linear = FORMS["after"]
            med = {f: statistics.median(t) for f, t in times.items()}
            rows.append(dict(batch=batch, prompt_len=prompt, budget=budget, ms=med, all=times,
                             same_tokens=tokens["before"] == tokens["after"]))  # fmt: skip
            print(
                f"B={batch:<3} P={prompt:<6} budget {budget:<4} before {med['before']:6.3f}  after "
                f"{med['after']:6.3f} ms/token  after/before {med['after'] / med['before']:.3f}  "
                f"same tokens {rows[-1]['same_tokens']}",
                flush=True,
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
