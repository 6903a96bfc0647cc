"""H2O's per-layer update in line against on a side stream (vlcache/engine/side_stream.py), in one run.

`generate_fast` end to end on bench_decode's real-size model and prompts, H2O at `--budget`, with
``side_stream=False`` and ``True`` alternating for ``--rounds`` rounds after one untimed run each (compiles,
grows the allocator); reports the decode ms per token (the captured loop's), its median per form, and whether the
forms' greedy tokens are equal. A run that also gave the side stream high CUDA priority (`torch.cuda.Stream(
priority=-1)`, not kept) was as fast: 4.206 / 5.323 / 4.990 ms against 4.205 / 5.323 / 5.013 at (1, 2K) /
(64, 2K) / (4, 32K) (results/bench/h2o_side_ab_priority_h200.json).

    PYTHONPATH=. python experiments/h2o_side_ab.py --points 1x2048,64x2048,4x32768 \\
        --out results/bench/h2o_side_ab_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from experiments.bench_decode import PRESETS, make_inputs, parse_points, real_size_adapter
from vlcache.engine.fast_decode import generate_fast
from vlcache.policies.policy import build_policy

FORMS = {"in-line": False, "side-stream": True}


def run(adapter, inputs, budget: float, new_tokens: int, form: str) -> tuple[float, list[list[int]]]:
    side = FORMS[form]
    stats: dict = {}
    out = generate_fast(adapter, build_policy(PRESETS["h2o"], budget), inputs, new_tokens, stop_at_eos=False,
                        stats=stats, side_stream=side)  # fmt: skip
    if stats.get("mode") != "graph" or stats.get("rule_update") != "static":
        raise RuntimeError(f"not the captured step with H2O's static update: {stats}")
    return stats["loop_ms"] / max(stats["loop_steps"], 1), out.tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x2048,64x2048")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "h2o_side_ab.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    points = parse_points(args.points)
    _, adapter = real_size_adapter(points, args.new_tokens, device)
    rows = []
    for batch, prompt in points:
        inputs = make_inputs(batch, prompt, device)
        times: dict[str, list[float]] = {f: [] for f in FORMS}
        tokens = {}
        for r in range(args.rounds + 1):  # round 0: untimed
            for form in FORMS:
                ms, tokens[form] = run(adapter, inputs, args.budget, args.new_tokens, form)
                if r:
                    times[form].append(ms)
        med = {f: statistics.median(t) for f, t in times.items()}
        same = all(t == tokens["in-line"] for t in tokens.values())
        rows.append(dict(batch=batch, prompt_len=prompt, budget=args.budget, ms=med, all=times, same_tokens=same))
        print(f"B={batch:<3} P={prompt:<6} " + "  ".join(f"{f} {m:6.3f}" for f, m in med.items())
              + f" ms/token; same tokens {same}", flush=True)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
