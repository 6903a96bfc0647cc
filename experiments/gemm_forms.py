"""The decode step's weight GEMMs at the benchmark's batch sizes, in two forms: `F.linear(x, W)` (what the fused
step runs) and `(W @ x.T).T` (the same product with the operands swapped, which makes cuBLAS pick other
kernels). Each is timed as one CUDA graph of 32 calls over 32 layers' own weights (memory, not L2), and
reported as the fraction of the measured copy bandwidth that reading the weights once would take. (The committed
results/bench/gemm_forms_h200.json was timed with decode_kernel_sweep.py's former CUDA-event timer.)

    PYTHONPATH=. python experiments/gemm_forms.py --out results/bench/gemm_forms_h200.json

LLaVA-1.6-Mistral-7B's shapes (hidden 4096, 32 query and 8 KV heads of 128, MLP 14336), bf16.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from experiments.bench_decode import graph_ms, measure_copy_bw

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
FORMS = {"linear": lambda x, w: F.linear(x, w), "swapped": lambda x, w: (w @ x.T).T}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,64")
    ap.add_argument("--out", default="results/bench/gemm_forms.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    bw = measure_copy_bw(device)
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) for _ in range(32)]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, k, device=device, dtype=torch.bfloat16)
            for form, fn in FORMS.items():
                ms = graph_ms(lambda fn=fn, x=x, weights=weights: [fn(x, w) for w in weights]) / 32
                row = dict(gemm=name, batch=batch, form=form, us=ms * 1e3, frac_of_copy_bw=n * k * 2 / (ms * 1e-3) / bw)
                rows.append(row)
                print(f"{name:8s} B={batch:3d} {form:8s} {row['us']:7.1f} us  {row['frac_of_copy_bw']:.2f} of copy bw")
        del weights
    with open(args.out, "w") as f:
        json.dump(
            dict(meta=dict(device=torch.cuda.get_device_name(device), copy_bw_bytes_per_s=bw), rows=rows), f, indent=1
        )


if __name__ == "__main__":
    main()
