"""The fused prefill (vlcache/engine/fused_prefill.py) against the model's own forward, timed on the GPU.

The language model of LLaVA-1.6-Mistral-7B at real size with random weights, as experiments/bench_decode.py builds
it (`model_config`, `build_model`, `TextAdapter`, `make_inputs`: 32 layers, hidden 4096, GQA 32:8, MLP 14336). At
each (batch, prompt length) point it times `adapter.prefill` (the whole prompt through the framework's attention
into a fresh `CompressedCache`, no policy observer, no compression) with the fused prefill off and on: one
warm-up, then the median of `--repeats` runs each, synchronised host clock. It reports the peak GPU memory of
each, and how far the fused prefill's last-position logits are from the model's own (max abs difference, and
whether the greedy tokens agree).

Prints one table and writes JSON to ``--out`` (default ``$OUT/prefill_fused.json``). Imports only torch,
transformers and vlcache (and bench_decode's builders). ``--tiny`` runs bench_decode's 2-layer model on small
points, on the CPU too (the fused prefill forced on there: PyTorch forms, or Triton under TRITON_INTERPRET=1).

Usage: PYTHONPATH=. python experiments/prefill_fused_check.py [--points 4x32768,1x2048] [--repeats 3] [--tiny]
       [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `experiments.` imports
from experiments.bench_decode import (  # noqa: E402
    TextAdapter,
    build_model,
    make_inputs,
    model_config,
    now,
    peak,
    peak_reset,
)
from vlcache.cache import CompressedCache  # noqa: E402
from vlcache.engine.attention import ForwardContext, forward_context  # noqa: E402
from vlcache.engine.fused_prefill import prefill_unsupported_reason  # noqa: E402


def prefill_once(adapter: TextAdapter, inputs: dict[str, torch.Tensor], device: torch.device):
    """One `adapter.prefill` into a fresh cache: (ms, last-position logits, peak bytes)."""
    info = adapter.prompt_info(inputs)
    cache = CompressedCache(adapter.num_layers)
    peak_reset(device)
    with torch.inference_mode(), forward_context(ForwardContext(cache=cache)):
        t0 = now(device)
        logits, _ = adapter.prefill(inputs, info, cache)
        ms = now(device) - t0
    return ms, logits, peak(device)


def time_point(adapter: TextAdapter, inputs: dict[str, torch.Tensor], fused: bool, repeats: int, device):
    """Median prefill ms over `repeats` after one warm-up, the runs, the largest peak, the last logits."""
    adapter.fused_prefill = fused  # forced either way: on the CPU (--tiny) too
    prefill_once(adapter, inputs, device)
    runs, peaks = [], []
    for _ in range(repeats):
        ms, logits, pk = prefill_once(adapter, inputs, device)
        runs.append(ms)
        peaks.append(pk)
    return statistics.median(runs), runs, max(peaks) if peaks[0] is not None else None, logits.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=None, help="comma-separated BATCHxPROMPT (default 4x32768,1x2048; "
                                                   "--tiny: 2x97,1x64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="bench_decode's 2-layer model, to check the script (CPU works)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "prefill_fused.json"))
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("no CUDA device: the real-size check needs a GPU (--tiny runs on the CPU)")
    spec = args.points or ("2x97,1x64" if args.tiny else "4x32768,1x2048")
    points = [tuple(int(x) for x in p.split("x")) for p in spec.split(",") if p]
    cfg = model_config(args.tiny, max(p for _, p in points) + 256)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {dev_name}; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    model = build_model(cfg, device, dtype=getattr(torch, args.dtype))
    adapter = TextAdapter(model, device)
    reason = prefill_unsupported_reason(model)
    if reason is not None:
        raise SystemExit(f"the fused prefill cannot run this model: {reason}")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    meta = dict(device=dev_name, dtype=args.dtype, tiny=args.tiny, repeats=args.repeats, weight_bytes=weight_bytes,
                torch=torch.__version__, transformers=transformers.__version__,
                interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    rows = []
    gb = lambda b: float("nan") if b is None else b / 2**30  # noqa: E731
    header = (f"{'B x P':>12} {'off ms':>10} {'fused ms':>10} {'speedup':>8} {'off GiB':>8} {'fused GiB':>9} "
              f"{'max|dlogit|':>12} {'max|logit|':>11} {'argmax eq':>9}")
    print(header, flush=True)
    for batch, prompt in points:
        inputs = make_inputs(batch, prompt, device)
        off_ms, off_runs, off_peak, off_logits = time_point(adapter, inputs, False, args.repeats, device)
        on_ms, on_runs, on_peak, on_logits = time_point(adapter, inputs, True, args.repeats, device)
        row = dict(
            batch=batch, prompt_len=prompt, tokens=batch * prompt,
            off_ms=off_ms, fused_ms=on_ms, speedup=off_ms / on_ms, off_runs_ms=off_runs, fused_runs_ms=on_runs,
            off_peak_bytes=off_peak, fused_peak_bytes=on_peak,
            logits_max_abs_diff=float((on_logits - off_logits).abs().max()),
            logits_max_abs=float(off_logits.abs().max()),
            argmax_equal=bool(torch.equal(on_logits.argmax(-1), off_logits.argmax(-1))),
        )
        rows.append(row)
        print(f"{batch:>4} x {prompt:<6} {off_ms:10.1f} {on_ms:10.1f} {row['speedup']:8.3f} {gb(off_peak):8.2f} "
              f"{gb(on_peak):9.2f} {row['logits_max_abs_diff']:12.4g} {row['logits_max_abs']:11.4g} "
              f"{str(row['argmax_equal']):>9}", flush=True)
        del inputs
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:  # after each point: a later point that runs out of memory keeps these
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
