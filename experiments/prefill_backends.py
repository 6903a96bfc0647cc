"""Prefill attention by SDPA backend (issue 7: end-to-end time at long prompts is mostly prefill).

Times `F.scaled_dot_product_attention` on LLaVA-1.6-Mistral-7B's prefill shapes (32 query heads, 8 KV heads,
head dim 128, bf16, causal) under each backend torch offers: FlashAttention-2 (what SDPA picks by default, and
what transformers' `generate` runs), cuDNN, memory-efficient and the default choice, each with grouped keys
(`enable_gqa=True`) and with keys repeated to the query heads, and with a boolean mask where the backend takes
one (left padding at batch > 1). One layer's call, CUDA events, warm-up then the median of repeats; outputs are
checked against the flash backend's. Prints one table and writes JSON (`--out`, default
`$OUT/prefill_backends.json`).

With `flash-attn-4` installed (FlashAttention-4's CuTe-DSL kernels; its Hopper forward is FlashAttention-3's
design) it also times that, causal with grouped keys.

Usage: PYTHONPATH=. python experiments/prefill_backends.py [--points 1x32768,4x32768,1x131072,64x2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlcache.engine.prefill_attention import load_fa4

HQ, HKV, D = 32, 8, 128
BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "default": None,
}


def time_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--points", default="1x32768,4x32768,1x131072,64x2048")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "prefill_backends.json"))
    args = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    print(f"{'point':>10} {'backend':>10} {'gqa':>9} {'mask':>5} {'ms':>9} {'TFLOP/s':>8} {'max err':>8}")
    for point in args.points.split(","):
        b, m = map(int, point.split("x"))
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(b, HQ, m, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, HKV, m, D, device=dev, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(b, HKV, m, D, device=dev, dtype=torch.bfloat16, generator=gen)
        flops = 4 * b * HQ * D * m * m / 2  # causal: half the score and value products
        mask = None
        if b > 1:  # left padding of up to 5% of the prompt, as a batch of unequal prompts has
            pad = torch.randint(0, m // 20 + 1, (b,), device=dev, generator=gen)
            valid = torch.arange(m, device=dev)[None] >= pad[:, None]
            mask = torch.ones(m, m, dtype=torch.bool, device=dev).tril()[None] & valid[:, None, :]
            mask = (mask | torch.eye(m, dtype=torch.bool, device=dev))[:, None]
        ref = {}
        for name, backends in BACKENDS.items():
            for gqa in ("grouped", "repeated"):
                for masked in (False, True) if mask is not None else (False,):
                    kk, vv = (k, v) if gqa == "grouped" else (k.repeat_interleave(HQ // HKV, 1),
                                                              v.repeat_interleave(HQ // HKV, 1))  # fmt: skip
                    kw = dict(attn_mask=mask) if masked else dict(is_causal=True)

                    def call(q=q, kk=kk, vv=vv, kw=kw, gqa=gqa):
                        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=gqa == "grouped", **kw)

                    row = dict(point=point, batch=b, prompt=m, backend=name, gqa=gqa, mask=masked)
                    try:
                        ctx = sdpa_kernel(backends) if backends else contextlib.nullcontext()
                        with ctx:
                            out = call()
                            ms = time_ms(call, args.repeats)
                        key = masked
                        if key not in ref:
                            ref[key] = out.float()
                        err = (out.float() - ref[key]).abs().max().item()
                        row.update(ms=ms, tflops=flops / ms / 1e9, max_err=err)
                        print(f"{point:>10} {name:>10} {gqa:>9} {str(masked):>5} {ms:9.2f} "
                              f"{flops / ms / 1e9:8.0f} {err:8.4f}")  # fmt: skip
                        del out
                    except RuntimeError as e:
                        row.update(error=str(e).split("\n")[0][:200])
                        print(f"{point:>10} {name:>10} {gqa:>9} {str(masked):>5}  unsupported: {row['error'][:80]}")
                    rows.append(row)
                    torch.cuda.empty_cache()
        fa4 = load_fa4()[0]
        if fa4 is not None:  # [B, S, H, D] views of the same tensors; grouped keys, causal, no mask
            row = dict(point=point, batch=b, prompt=m, backend="fa4", gqa="grouped", mask=False)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

            def call_fa4(fa4=fa4, qt=qt, kt=kt, vt=vt):
                out = fa4(qt, kt, vt, causal=True)
                return out[0] if isinstance(out, tuple) else out

            try:
                out = call_fa4().transpose(1, 2)
                ms = time_ms(call_fa4, args.repeats)
                err = (out.float() - ref[False]).abs().max().item()
                row.update(ms=ms, tflops=flops / ms / 1e9, max_err=err)
                print(f"{point:>10} {'fa4':>10} {'grouped':>9} {'False':>5} {ms:9.2f} {flops / ms / 1e9:8.0f} "
                      f"{err:8.4f}")  # fmt: skip
                del out
            except Exception as e:  # noqa: BLE001  (reported, as an unsupported backend above)
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                print(f"{point:>10} {'fa4':>10}  failed: {row['error'][:120]}")
            rows.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__,
                cudnn=torch.backends.cudnn.version())  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
