"""Per-token decode rules of the fast path: the PyTorch static form against the Triton form (rule_ops.py).

At the decode benchmark's shapes (bench.md; LLaVA-1.6-Mistral-7B's language model: 32 layers, 8 KV heads, 32 query
heads, head dim 128, bf16) and per point (batch, prompt), a reserved `CompressedCache` is filled with random entries,
`keep = ceil(0.1 · prompt)` per row plus 100 reserved slots, and each rule is set up as its preset does:

* ``h2o`` (Zhang et al. 2023): random prefill scores, no sinks, recent window half the keep count;
* ``fixed_point`` (Elastic Cache, Liu et al. 2024): budget 0.1 of the tokens seen, recent distance 24;
* ``rolling`` (StreamingLLM, Xiao et al. 2024): 4 sinks, re-rotated by a plain RoPE module.

One decode step's rule work is, for every layer, the append of a random entry (`CompressedLayer.update`) and
`on_token_static` (and, after the last layer, `on_step_static` where the rule has one: FixedPoint's Triton form
updates every layer there, in one launch). Each of three steps is captured in a CUDA graph: the appends alone,
appends + the PyTorch form, appends + the Triton form; a graph is replayed ``--iters`` times between CUDA events,
median over ``--repeats`` (after ``--warmup`` eager steps). The rule's cost is the step minus the appends.
``--with-attention``: every step (the appends' too) also runs the decode attention of each layer after its append,
as the fused step does; H2O's Triton form then takes its logits from it, so its cost includes the attention's extra
stores and not its own logits launch. Before timing, both forms run ``--check-steps`` steps on the same random
inputs and their caches are compared (same lengths, same valid keys, values and positions; H2O's scores allclose;
H2O's entries in position order, as its Triton form fills a victim's slot with the row's last entry). A difference
fails the run, except H2O's, which is reported: its victim is an argmin of float32 scores that round differently
where rows split (experiments/h2o_split_check.py).

Prints one table and writes JSON to ``--out``. Imports torch, triton, transformers and vlcache only (no hydra).
``--tiny``: small shapes, on the CPU under ``TRITON_INTERPRET=1`` (no graphs, host clock) to check the script.

Usage: python experiments/bench_rules.py [--points 1x2048,1x32768,1x131072,64x2048] [--rules h2o,fixed_point,rolling]
       [--repeats 20] [--iters 10] [--min-per-split N] [--block-n N] [--block-s N] [--num-warps N] [--shift-warps N]
       [--precision ieee|tf32x3] [--h2o-finish fused|launch] [--with-attention]
       [--select-block-n N] [--kernels] [--tiny] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vlcache.cache import CompressedCache
from vlcache.kernels import rule_ops
from vlcache.kernels.decode_attention import decode_attention
from vlcache.policies.decode_rules import H2O, FixedPoint, Rolling

BUDGET = 0.1
RESERVED = 100


@dataclasses.dataclass
class Shape:
    layers: int = 32
    kv_heads: int = 8
    q_heads: int = 32
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16


TINY = Shape(layers=2, kv_heads=2, q_heads=8, head_dim=32)


@contextlib.contextmanager
def form(name: str):
    """`on_token_static` (and `drop_`) in their PyTorch form (the kernels reported unsupported), or as they are."""
    saved = rule_ops.supported
    if name == "torch":
        rule_ops.supported = lambda t: False
    try:
        yield
    finally:
        rule_ops.supported = saved


def build(rule_name: str, batch: int, prompt: int, shape: Shape, device, seed: int):
    """A reserved cache of random entries and the rule set up on it (as `Policy.compress` and the fast path do)."""
    gen = torch.Generator(device).manual_seed(seed)
    keep = math.ceil(BUDGET * prompt)
    L, H, D = shape.layers, shape.kv_heads, shape.head_dim
    cache = CompressedCache(L)
    for layer in cache.layers:
        rand = lambda: torch.randn(batch, H, keep, D, generator=gen, device=device).to(shape.dtype)  # noqa: E731
        layer.update(rand(), rand())
        layer.seen = prompt  # the prompt was `prompt` tokens long; `keep` of them were kept
        layer.positions = (torch.arange(keep, device=device) * (prompt // keep)).expand(batch, H, keep).clone()
    keep_counts = torch.full((L, batch, H), keep, device=device)
    info = SimpleNamespace(lengths=torch.full((batch,), prompt, device=device), m=prompt,
                           pad=torch.zeros(batch, dtype=torch.long, device=device))  # fmt: skip
    if rule_name == "h2o":
        rule = H2O()
        scores = [torch.rand(batch, H, keep, generator=gen, device=device) for _ in range(L)]
        recent = torch.full((L, batch), round(0.5 * keep), device=device)
        rule.setup(cache, info, BUDGET, keep_counts, scores=scores, sinks=0, recent=recent)
    elif rule_name == "fixed_point":
        rule = FixedPoint(24)
        rule.setup(cache, info, BUDGET, keep_counts)
    else:
        rule = Rolling()
        rope = {"rope_type": "default", "rope_theta": 1e6}  # plain RoPE, Mistral's base
        rule.rotary = LlamaRotaryEmbedding(LlamaConfig(head_dim=D, rope_parameters=rope)).to(device)
        rule.setup(cache, info, BUDGET, keep_counts, sinks=4)
    for layer in cache.layers:
        layer.reserve(keep + RESERVED)
    rule.prepare_static(cache)
    return rule, cache


def make_step(rule, cache, inputs, attend: bool = False):
    """Every layer: the new entry appended, then the rule's update; without a rule, the append is undone (one more
    launch per layer) so that the buffers do not overflow. `attend`: the decode attention after the append, as in
    the fused step, writing H2O's logits where the rule takes them from there (`attention_logits`)."""
    k, v, q = inputs
    hq = q.shape[2]

    def step():
        for i, layer in enumerate(cache.layers):
            layer.update(k[i], v[i])
            if attend:
                give = getattr(rule, "attention_logits", None)
                decode_attention(q[i], layer.keys, layer.values, layer.length, logits=give and give(i, hq))
            if rule is not None:
                rule.on_token_static(i, q[i], cache)
            else:
                layer.length.sub_(1)
        if rule is not None and hasattr(rule, "on_step_static"):  # FixedPoint's Triton form: all layers at once
            rule.on_step_static(cache)

    return step


class Runner:
    """One step in one form (`form`), warmed up and captured in a CUDA graph on CUDA; `run()` replays it (on the
    CPU it runs the step again, in its form)."""

    def __init__(self, step, name: str, warmup: int, device) -> None:
        self.step, self.name = step, name
        self.cuda = device.type == "cuda"
        self.graph = None
        with form(name):
            if self.cuda:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(warmup):
                        step()
                torch.cuda.current_stream(device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    step()
            else:
                for _ in range(warmup):
                    step()

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            with form(self.name):
                self.step()

    def time_ms(self, repeats: int, iters: int) -> float:
        """Median over `repeats` of the mean time of `iters` back-to-back steps."""
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    self.run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    self.run()
                times.append((time.perf_counter() - t0) * 1e3 / iters)
        return statistics.median(times)


def _by_position(layer, *tensors):
    """`tensors` (`[B, H, cap, ...]`) with each row's valid entries in position order (H2O's Triton form leaves
    them unordered), the spare room after them."""
    valid = torch.arange(layer.capacity, device=layer.length.device) < layer.length[..., None]
    order = torch.where(valid, layer.positions, 2**62).argsort(-1)
    out = []
    for t in tensors:
        idx = order.view(*order.shape, *[1] * (t.dim() - 3)).expand_as(t)
        out.append(t.gather(2, idx))
    return out


def compare(rules, caches, rule_name: str) -> dict:
    """Rows whose valid entries differ between the two forms (and H2O's largest score difference); H2O's in
    position order."""
    differ, score_err = 0, 0.0
    for i, (a, b) in enumerate(zip(caches[0].layers, caches[1].layers)):
        same = a.length == b.length
        valid = torch.arange(a.capacity, device=a.length.device) < torch.minimum(a.length, b.length)[..., None]
        extra = [rules[0].scores[i], rules[1].scores[i]] if rule_name == "h2o" else [a.positions, b.positions]
        ta = [a.keys, a.values, a.positions, extra[0]]
        tb = [b.keys, b.values, b.positions, extra[1]]
        if rule_name == "h2o":
            ta, tb = _by_position(a, *ta), _by_position(b, *tb)
        for x, y in zip(ta[:2], tb[:2]):
            same &= ((x == y).all(-1) | ~valid).all(-1)
        same &= ((ta[2] == tb[2]) | ~valid).all(-1)
        differ += int((~same).sum())
        if rule_name == "h2o":
            s, t = torch.where(valid, ta[3], 0.0), torch.where(valid, tb[3], 0.0)
            score_err = max(score_err, float(((s - t).abs() / (t.abs() + 1e-6)).max()))
    return {"rows_differing": differ, "equal": differ == 0, "h2o_score_max_rel_err": score_err}


def launches(rule_name: str, batch: int, cap: int, shape: Shape, device, attend: bool) -> str:
    """The Triton form's launches per layer (rule_ops.py), from the row split the shapes give."""
    n = rule_ops.num_splits(batch * shape.kv_heads, cap, device)
    if rule_name == "h2o":  # logits (unless the attention wrote them), scores and selection, victim (unless fused)
        return "1" if n == 1 else str((not attend) + 1 + (rule_ops.DEFAULT_CONFIG.h2o_finish != "fused"))
    if rule_name == "rolling":
        return ("1" if n == 1 else "2") + " + sink re-rotation (PyTorch)"
    return "1"


def kernel_times(runner, steps: int = 5) -> dict[str, float]:
    """µs per step of each kernel in the runner's captured step (appends included), by kernel name."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.run()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[e.name[:60]] = out.get(e.name[:60], 0.0) + e.time_range.elapsed_us() / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def bench_point(rule_name, batch, prompt, shape, device, args) -> dict:
    keep = math.ceil(BUDGET * prompt)
    gen = torch.Generator(device).manual_seed(1)
    L, H, Hq, D = shape.layers, shape.kv_heads, shape.q_heads, shape.head_dim
    inputs = [torch.empty(L, batch, h, 1, D, device=device, dtype=shape.dtype) for h in (H, H, Hq)]

    def refill():
        for t in inputs:
            t.copy_(torch.randn(t.shape, generator=gen, device=device))

    refill()
    rules, caches, runners = [], [], {}
    for name in ("torch", "triton"):
        with form(name):
            rule, cache = build(rule_name, batch, prompt, shape, device, seed=0)
        runners[name] = Runner(make_step(rule, cache, inputs, args.with_attention), name, args.warmup, device)
        rules.append(rule)
        caches.append(cache)
    # the same inputs through both forms, step after step, then the caches compared
    for _ in range(args.check_steps):
        refill()
        for name in ("torch", "triton"):
            runners[name].run()
    check = compare(rules[::-1], caches[::-1], rule_name)  # [0]: Triton
    row = {"rule": rule_name, "batch": batch, "prompt": prompt, "keep": keep, "capacity": keep + RESERVED}
    row.update(check)
    for name in ("torch", "triton"):
        row[f"{name}_step_ms"] = runners[name].time_ms(args.repeats, args.iters)
    if args.kernels and device.type == "cuda":
        row["triton_kernels_us"] = kernel_times(runners["triton"])
    del rules, caches, runners
    _, cache = build(rule_name, batch, prompt, shape, device, seed=0)
    appends = Runner(make_step(None, cache, inputs, args.with_attention), "triton", args.warmup, device)
    row["append_ms"] = appends.time_ms(args.repeats, args.iters)
    for name in ("torch", "triton"):
        row[f"{name}_rule_ms"] = row[f"{name}_step_ms"] - row["append_ms"]
    row["speedup"] = row["torch_rule_ms"] / max(row["triton_rule_ms"], 1e-9)
    row["triton_launches_per_layer"] = launches(rule_name, batch, keep + RESERVED, shape, device, args.with_attention)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", default="1x2048,1x32768,1x131072,64x2048", help="BATCHxPROMPT, comma-separated")
    p.add_argument("--rules", default="h2o,fixed_point,rolling")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--iters", type=int, default=10, help="graph replays per timed repeat")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-steps", type=int, default=20)
    p.add_argument("--min-per-split", type=int, help="rule_ops.RuleConfig override (row split)")
    p.add_argument("--block-n", type=int, help="rule_ops.RuleConfig override (H2O key tile, split unit)")
    p.add_argument("--block-s", type=int, help="rule_ops.RuleConfig override (shift tile)")
    p.add_argument("--num-warps", type=int, help="rule_ops.RuleConfig override")
    p.add_argument("--shift-warps", type=int, help="rule_ops.RuleConfig override (the shift launch's warps)")
    p.add_argument("--precision", choices=["ieee", "tf32x3"], help="H2O's logits (rule_ops.RuleConfig)")
    p.add_argument("--select-block-n", type=int, help="rule_ops.RuleConfig override (H2O's scores tile)")
    p.add_argument("--h2o-finish", choices=["fused", "launch"], help="H2O's victim pick (rule_ops.RuleConfig)")
    p.add_argument("--with-attention", action="store_true", help="every form's step also runs the decode attention "
                   "after each append (the appends' step too), so H2O's Triton form takes its logits from it")
    p.add_argument("--tiny", action="store_true", help="small shapes (CPU under TRITON_INTERPRET=1, or CUDA)")
    p.add_argument("--kernels", action="store_true", help="also each Triton-form kernel's µs per step (profiler)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_rules.json"))
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not rule_ops.supported(torch.empty(0)):
        raise SystemExit("no CUDA: run with TRITON_INTERPRET=1 (and --tiny)")
    shape = TINY if args.tiny else Shape()
    points = "1x512,2x300" if args.tiny and args.points == p.get_default("points") else args.points
    if args.tiny:
        args.repeats, args.iters, args.check_steps = min(args.repeats, 2), min(args.iters, 2), min(args.check_steps, 5)
        args.min_per_split = args.min_per_split or 32  # rows of a few hundred entries still split
        args.block_n = args.block_n or 16
    names = ("min_per_split", "block_n", "block_s", "num_warps", "shift_warps", "precision", "h2o_finish",
             "select_block_n")
    over = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    rule_ops.DEFAULT_CONFIG = dataclasses.replace(rule_ops.DEFAULT_CONFIG, **over)

    rows = []
    head = f"{'point':>9} {'rule':>11} {'cap':>6} {'append':>7} {'torch':>7} {'triton':>7} {'x':>6}  launches  equal"
    print(f"rule update per decode step, all {shape.layers} layers, ms (step minus the appends); {device}")
    print(head)
    with torch.inference_mode():
        for point in points.split(","):
            batch, prompt = (int(x) for x in point.split("x"))
            for rule_name in args.rules.split(","):
                r = bench_point(rule_name, batch, prompt, shape, device, args)
                rows.append(r)
                print(f"{point:>9} {rule_name:>11} {r['capacity']:>6} {r['append_ms']:7.3f} {r['torch_rule_ms']:7.3f} "
                      f"{r['triton_rule_ms']:7.3f} {r['speedup']:6.1f}  {r['triton_launches_per_layer']:<8}  "
                      f"{r['equal']} ({r['rows_differing']} rows differ)", flush=True)  # fmt: skip
                for k, us in r.get("triton_kernels_us", {}).items():
                    print(f"{'':>22} {us:9.1f} us/step  {k}")
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {k: str(v) for k, v in dataclasses.asdict(shape).items()},
        "config": dataclasses.asdict(rule_ops.DEFAULT_CONFIG),
        "budget": BUDGET,
        "reserved": RESERVED,
        "args": vars(args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    if not all(r["equal"] for r in rows if r["rule"] != "h2o"):  # deletions by count and position: exact
        raise SystemExit("the two forms' caches differ (see rows_differing)")
    if not all(r["equal"] for r in rows):  # H2O's victim is an argmin of float32 scores
        print("H2O: rows differ between the two forms. Where its rows split, the scores round differently, and a "
              "float32 near-tie can pick the other victim: experiments/h2o_split_check.py finds the first "
              "difference and the two candidates' float64 gap.")  # fmt: skip


if __name__ == "__main__":
    main()
