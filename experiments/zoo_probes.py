"""Linear probes of the embedded model's training runs (vlcache/zoo/README.md; CPU, a few training samples).

* ``forms``: on synth_docvqa forms, what the projector hands the language model. For each cell: is the nearest of
  the language model's character embeddings (by cosine) the printed character, and can a least-squares linear
  probe (fitted on half the cells, tested on the other half) read it; plus `common_logodds` and `align_loss`.
* ``multi``: on synth_multi prompts, whether each image token's hidden state after every decoder layer tells which
  of the four images it is in (the same least-squares probe, fitted on half the prompts).

Usage: python experiments/zoo_probes.py forms|multi WEIGHTS [--n 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from vlcache.data import generators
from vlcache.data.render import CELL_BLANK, NUM_CELL_CLASSES
from vlcache.zoo import train as T

PROBE_START = 500_000_000  # training indices no run has reached


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, train: torch.Tensor) -> torch.Tensor:
    """Per-sample correctness of a least-squares linear classifier fitted on `train`, on the rest."""
    x = torch.cat([x - x[train].mean(0), torch.ones(len(x), 1)], 1)
    w = torch.linalg.lstsq(x[train], F.one_hot(y[train], classes).float()).solution
    return (x[~train] @ w).argmax(-1) == y[~train]


def forms(model, enc: T.Encoder, n: int) -> None:
    samples = [generators()["synth_docvqa"]("train", PROBE_START + i, labels=True) for i in range(n)]
    batch = T.training_batch(enc, samples)
    tap = T.FeatureTap(model)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], pixel_values=T.normalise(batch["pixels"]), use_cache=False)
    feats, cells = tap.pop().float(), batch["cells"].long()
    table, embed = enc.grid_table(), model.get_input_embeddings()
    tokens = table.unique()
    nearest = tokens[(F.normalize(feats, dim=-1) @ F.normalize(embed.weight[tokens].float(), dim=-1).T).argmax(-1)]
    drawn = cells != CELL_BLANK
    right = nearest == table[cells]
    x, y = feats.reshape(-1, feats.shape[-1]), cells.reshape(-1)
    train = torch.arange(len(y)) < len(y) // 2
    probed = probe_accuracy(x, y, NUM_CELL_CLASSES, train)
    print(f"drawn cells {drawn.float().mean():.3f} of all; nearest embedding right: drawn "
          f"{right[drawn].float().mean():.3f} blank {right[~drawn].float().mean():.3f}; linear probe on drawn cells "
          f"{probed[y[~train] != CELL_BLANK].float().mean():.3f}")  # fmt: skip
    print(f"common_logodds {T.common_logodds(feats):.2f} align_loss {T.align_loss(feats, cells, embed, table):.3f} "
          f"feature norm {feats.norm(dim=-1).mean():.2f} embedding norm {embed(table[cells]).norm(dim=-1).mean():.2f}")


def multi(model, enc: T.Encoder, n: int) -> None:
    samples = [generators()["synth_multi"]("train", PROBE_START + i) for i in range(n)]
    batch = T.training_batch(enc, samples)
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=T.normalise(batch["pixels"]), output_hidden_states=True)
    image = ids == enc.image_id
    which = T.image_numbers(ids, enc.image_id)
    train = image.nonzero()[:, 0] < n // 2
    for layer, hidden in enumerate(out.hidden_states):  # 0: the embeddings; the last has the final norm applied
        acc = probe_accuracy(hidden[image].float(), which, 4, train).float().mean()
        print(f"after layer {layer}: the image's number read at {acc:.3f} (chance 0.25)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("probe", choices=("forms", "multi"))
    p.add_argument("weights", help="a run's model_fp32.safetensors or model_predecay.safetensors")
    p.add_argument("--n", type=int, default=0, help="samples (default: 8 forms, 12 prompts)")
    args = p.parse_args()
    enc = T.Encoder()
    model = T.build_model(T.TRAINED_SPEC, enc)
    T.load_weights(model, Path(args.weights))
    (forms if args.probe == "forms" else multi)(model.eval(), enc, args.n or (8 if args.probe == "forms" else 12))


if __name__ == "__main__":
    main()
