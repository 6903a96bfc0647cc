"""Where H2O's split Triton form and its PyTorch form first choose different victims, and why.

bench_rules.py found one row of 512 at (64, 2K) whose cache differed between the two forms after 20 steps when
H2O's rows are split (``--min-per-split 64`` or 128; results/bench/rules_h2o_mps*_h200.json). This runs the same
setup layer by layer, compares the two forms' victims (their positions) after every layer's update, and at the
first difference recomputes that row's updated scores in float64 from the state before the update: if the two
victims' float64 scores are within float32 rounding of each other, the forms differ by a near-tie broken by
rounding (the split form normalises the softmax from per-split partials), not by a wrong victim.

    PYTHONPATH=. python experiments/h2o_split_check.py --point 64x2048 --min-per-split 64 --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from experiments.bench_rules import TINY, Shape, build, form
from vlcache.kernels import rule_ops


def float64_scores(scores, keys, length, query, i_row):
    """Row `i_row = (b, h)`'s running scores plus the decode query's attention (softmax per query head, summed
    over the group), in float64."""
    b, h = i_row
    group = query.shape[1] // keys.shape[1]
    n = int(length[b, h])
    q = query[b, h * group : (h + 1) * group, 0].double() * keys.shape[-1] ** -0.5  # [G, D]
    logits = q @ keys[b, h, :n].double().T  # [G, n]
    return scores[b, h, :n].double() + torch.softmax(logits, -1).sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", default="64x2048")
    ap.add_argument("--min-per-split", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="small shapes, to check the script (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "h2o_split_check.json"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    over = dict(min_per_split=args.min_per_split) | (dict(block_n=16) if args.tiny else {})
    rule_ops.DEFAULT_CONFIG = dataclasses.replace(rule_ops.DEFAULT_CONFIG, **over)
    batch, prompt = (int(x) for x in args.point.split("x"))
    shape = TINY if args.tiny else Shape()
    L, H, Hq, D = shape.layers, shape.kv_heads, shape.q_heads, shape.head_dim
    gen = torch.Generator(device).manual_seed(1)
    forms = {}
    for name in ("torch", "triton"):
        with form(name):
            forms[name] = build("h2o", batch, prompt, shape, device, seed=0)
    found, decisions = [], 0
    with torch.inference_mode():
        for step in range(args.steps):
            k, v, q = (torch.randn(L, batch, n, 1, D, generator=gen, device=device).to(shape.dtype) for n in (H, H, Hq))
            for i in range(L):
                for name, (_, cache) in forms.items():
                    with form(name):
                        cache.layers[i].update(k[i], v[i])
                rule_t, cache_t = forms["torch"]
                lay = cache_t.layers[i]
                before = (rule_t.scores[i].clone(), lay.keys.clone(), lay.length.clone(), lay.positions.clone())
                for name, (rule, cache) in forms.items():
                    with form(name):
                        rule.on_token_static(i, q[i], cache)
                a, b = forms["torch"][1].layers[i], forms["triton"][1].layers[i]
                valid = torch.arange(a.capacity, device=device) < a.length[..., None]
                same = (a.length == b.length) & ((a.positions == b.positions) | ~valid).all(-1)
                decisions += int((before[2] > rule_t.static_keep[i]).sum())
                for bh in (~same).nonzero().tolist():
                    s64 = float64_scores(before[0], before[1], before[2], q[i], bh)
                    n = int(before[2][bh[0], bh[1]])
                    cand = n - int(rule_t.static_recent[i][bh[0]])
                    # each form's victim: the first slot whose entry moved
                    victims = {}
                    for name, lay_f in (("torch", a), ("triton", b)):
                        moved = (lay_f.positions[bh[0], bh[1], : n - 1] != before[3][bh[0], bh[1], : n - 1]).nonzero()
                        victims[name] = int(moved[0]) if len(moved) else n - 1
                    low = torch.topk(s64[:cand], 3, largest=False)
                    found.append(dict(
                        step=step, layer=i, row=bh, n=n, candidates=cand, victims=victims,
                        victims_float64={k: float(s64[v]) for k, v in victims.items()},
                        lowest3_float64=low.values.tolist(), lowest3_slots=low.indices.tolist(),
                        rel_gap_lowest_two=float((low.values[1] - low.values[0]) / low.values[0]),
                    ))  # fmt: skip
                    print(json.dumps(found[-1]), flush=True)
                if found:
                    break
            if found:
                break
    print(f"{decisions} victim decisions compared before the first difference" if found else
          f"no difference in {decisions} victim decisions")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(dict(point=args.point, min_per_split=args.min_per_split, decisions=decisions, found=found), f,
                  indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
