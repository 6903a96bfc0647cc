"""The decode attention's merge launch (`_combine_kernel`): how many programs share a row's head dimension
(`COMBINE_BLOCK_D`) and their warps, timed as decode_kernel_sweep times the attention (one CUDA graph over 32
layers' own buffers), split launch included, with the default `DecodeConfig`.

    PYTHONPATH=. python experiments/combine_sweep.py --out results/bench/combine_sweep_h200.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

import torch

from experiments.bench_decode import graph_ms
from experiments.decode_kernel_sweep import LAYERS, layers

da = importlib.import_module("vlcache.kernels.decode_attention")  # the module (the package exports the function)

FORMS = [(128, 4), (64, 2), (32, 2), (32, 1), (16, 1)]  # (COMBINE_BLOCK_D, COMBINE_WARPS); (128, 4): one program


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x131072,4x32768,1x32768")
    ap.add_argument("--budgets", default="0.1,1.0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "combine_sweep.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    for point in args.points.split(","):
        batch, prompt = (int(x) for x in point.split("x"))
        for budget in (float(b) for b in args.budgets.split(",")):
            q, lay = layers(batch, max(1, round(budget * prompt)), device)
            ref = da.decode_attention(q, *lay[0])
            times: dict[str, list[float]] = {}
            for _ in range(args.rounds):  # alternating, so drift between forms cancels
                for bd, nw in FORMS:
                    da.COMBINE_BLOCK_D, da.COMBINE_WARPS = bd, nw
                    diff = float((da.decode_attention(q, *lay[0]).float() - ref.float()).abs().max())
                    assert diff <= 2**-7 * float(ref.float().abs().max()), diff  # the same merge, to bf16 rounding
                    ms = graph_ms(lambda q=q, lay=lay: [da.decode_attention(q, k, v, n) for k, v, n in lay])
                    times.setdefault(f"{bd}/{nw}", []).append(ms * 1e3 / LAYERS)
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            rows.append(dict(point=point, budget=budget, us_per_layer=med, all=times))
            print(f"{point} budget {budget}: " + "  ".join(f"{k} {v:6.2f}" for k, v in med.items()) + " us/layer",
                  flush=True)  # fmt: skip
            del lay
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(device), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
