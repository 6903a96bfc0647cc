"""The decode attention's merge launch (`_combine_kernel`): how many programs share a row's head dimension
(`COMBINE_BLOCK_D`) and their warps, timed as decode_kernel_sweep times the attention (one CUDA graph over 32
layers' own buffers), split launch included, with the default `DecodeConfig`.

    PYTHONPATH=. python experiments/combine_sweep.py --out results/bench/combine_sweep_h200.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os

import torch

from experiments.decode_kernel_sweep import Check, Step, sweep_forms

da = importlib.import_module("vlcache.kernels.decode_attention")  # the module (the package exports the function)

FORMS = [(128, 4), (64, 2), (32, 2), (32, 1), (16, 1)]  # (COMBINE_BLOCK_D, COMBINE_WARPS); (128, 4): one program


def forms_for(batch: int, q: torch.Tensor, lay: list) -> tuple[dict[str, Step], Check]:
    """The decode attention over every layer with each of `FORMS`, checked on layer 0 against its attention as
    launched before the forms (the merge is the same whichever programs do it)."""
    ref = da.decode_attention(q, *lay[0])

    def step(bd: int, nw: int) -> list[torch.Tensor]:
        # module globals read at each launch: set inside the step, so the graph captures this form's launch
        da.COMBINE_BLOCK_D, da.COMBINE_WARPS = bd, nw
        return [da.decode_attention(q, k, v, n) for k, v, n in lay]

    def check(name: str, out: list[torch.Tensor]) -> None:
        diff = float((out[0].float() - ref.float()).abs().max())
        assert diff <= 2**-7 * float(ref.float().abs().max()), (name, diff)  # the same merge, to bf16 rounding

    return {f"{bd}/{nw}": functools.partial(step, bd, nw) for bd, nw in FORMS}, check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="1x131072,4x32768,1x32768")
    ap.add_argument("--budgets", default="0.1,1.0")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "combine_sweep.json"))
    args = ap.parse_args()
    device = torch.device("cuda")
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = sweep_forms(args.points.split(","), budgets, args.rounds, device, forms_for)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(device), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
