"""Which image patches each layer kept, drawn over the image.

`kept_patches_figure` needs only the image, the image's token span in the prompt and the engine's kept
positions (GenerationOutput.kept_positions: per layer `[Hkv, K]` prompt positions for one sample, -1 unused;
merged anchors count as kept). `kept_patches_for_sample` runs the engine on one sample to get them, and
`kept_patches_for_job` does it for the first samples of a finished job's own model, policy and dataset.
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from analysis.style import budget_label, policy_label, save

IMAGE_SIZE = 336  # LLaVA-1.5 geometry: 336 px images, 14 px patches, 24 x 24 = 576 image tokens
# Dropped patches are dimmed, kept ones shown as they are: black with opacity 0.8·(1 - fraction kept).
DIM = ListedColormap(np.stack([*np.zeros((3, 256)), 0.8 * (1 - np.linspace(0, 1, 256))], 1))


def patch_fractions(kept_positions: Any, image_span: tuple[int, int]) -> np.ndarray:
    """`[side, side]` fraction of KV heads that kept each patch of the image at prompt positions
    `[start, end)`, from one layer's kept positions `[Hkv, K]` (row-major patches, as CLIP orders them)."""
    start, end = image_span
    side = math.isqrt(end - start)
    if side * side != end - start:
        raise ValueError(f"image span {image_span} has {end - start} tokens, not a square grid of patches")
    pos = np.asarray(kept_positions.cpu() if hasattr(kept_positions, "cpu") else kept_positions)
    pos = pos.reshape(-1, pos.shape[-1])
    counts = np.zeros(end - start)
    for head in pos:
        inside = np.unique(head[(head >= start) & (head < end)]) - start
        counts[inside.astype(int)] += 1
    return (counts / len(pos)).reshape(side, side)


def _default_layers(num_layers: int, count: int = 4) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, min(count, num_layers))})


def kept_patches_figure(
    image: Image.Image,
    image_span: tuple[int, int],
    kept_positions: Sequence[Any],
    layers: Sequence[int] | None = None,
    image_size: int = IMAGE_SIZE,
    title: str | None = None,
    path: str | Path | None = None,
) -> Figure:
    """The image as the model saw it (resized and centre-cropped to `image_size`, as CLIP's processor does),
    then one panel per chosen layer (default: 4 spread from first to last) with the patch grid drawn and
    each patch dimmed by the fraction of KV heads that dropped it, so kept patches stay bright."""
    layers = list(layers) if layers is not None else _default_layers(len(kept_positions))
    shown = ImageOps.fit(image.convert("RGB"), (image_size, image_size), method=Image.Resampling.BICUBIC)
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.3 * (len(layers) + 1) + 0.8, 3.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(shown, extent=(0, image_size, image_size, 0))
    axes[0].set_title(f"input image ({image_size}×{image_size} px)", fontsize="medium")
    mappable = None
    for ax, layer in zip(axes[1:], layers):
        frac = patch_fractions(kept_positions[layer], image_span)
        side = frac.shape[0]
        ax.imshow(shown, extent=(0, image_size, image_size, 0))
        mappable = ax.imshow(frac, cmap=DIM, vmin=0, vmax=1, extent=(0, image_size, image_size, 0),
                             interpolation="nearest")
        step = image_size / side
        for k in range(side + 1):
            ax.axhline(k * step, color="white", linewidth=0.3, alpha=0.35)
            ax.axvline(k * step, color="white", linewidth=0.3, alpha=0.35)
        ax.set_title(f"layer {layer}: {frac.mean():.0%} of patches kept", fontsize="medium")
    for ax in axes:
        ticks = np.linspace(0, image_size, 5)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xlim(0, image_size)
        ax.set_ylim(image_size, 0)
        ax.set_xlabel("x (pixels)")
        ax.tick_params(labelsize="small")
    axes[0].set_ylabel("y (pixels)")  # the panels share the image's pixel axes
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=list(axes[1:]), fraction=0.025, pad=0.02)
        bar.set_label("fraction of KV heads keeping the patch")
    fig.suptitle(title or "Image patches kept in the KV cache, per layer")
    return save(fig, path)


@dataclass
class KeptPatches:
    """What the kept-patches figure needs for one sample, with the run's answer for the title."""

    images: list[Image.Image]
    spans: list[tuple[int, int]]  # per image: its [start, end) token positions in the prompt
    kept_positions: list[Any]  # per layer `[Hkv, K]`
    question: str
    answer: str
    policy: str
    budget: float

    def figure(self, image_index: int = 0, layers: Sequence[int] | None = None,
               path: str | Path | None = None) -> Figure:
        title = (f"{policy_label(self.policy)} at {budget_label(self.budget)} budget"
                 f" · Q: {self.question[:60]} · A: {self.answer[:40]!r}")
        return kept_patches_figure(self.images[image_index], self.spans[image_index], self.kept_positions,
                                   layers=layers, title=title, path=path)


def image_spans(image_mask: Any) -> list[tuple[int, int]]:
    """Contiguous runs of image tokens in one prompt's `[m]` mask: one `[start, end)` per image."""
    idx = np.flatnonzero(np.asarray(image_mask.cpu() if hasattr(image_mask, "cpu") else image_mask))
    if not len(idx):
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def kept_patches_for_sample(adapter, policy, image: Image.Image | list[Image.Image], question: str,
                            max_new_tokens: int = 16) -> KeptPatches:
    """Runs vlcache's engine (prefill → compress → decode) on one sample and returns the kept positions."""
    from vlcache.engine.generate import generate

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    inputs = adapter.build_inputs([question], [images])
    info = adapter.prompt_info(inputs)
    out = generate(adapter, policy, inputs, max_new_tokens)
    pad = int(info.pad[0])  # a batch of one has no padding; kept positions are unpadded anyway
    answer = adapter.processor.tokenizer.decode(out.tokens[0], skip_special_tokens=True).strip()
    return KeptPatches(
        images=images,
        spans=[(s - pad, e - pad) for s, e in image_spans(info.image_mask[0])],
        kept_positions=[layer[0] for layer in out.kept_positions],
        question=question,
        answer=answer,
        policy=policy.cfg.name,
        budget=policy.budget,
    )


def _decode_images(value: Any) -> Any:
    """Parquet stores HF `Image` features as {"bytes", "path"}: back to PIL, as lmms-eval's docs have them."""
    if isinstance(value, dict) and "bytes" in value and value["bytes"] is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, list):
        return [_decode_images(v) for v in value]
    return value


def sample_from_task(dataset: dict, index: int = 0) -> tuple[list[Image.Image], str, Any]:
    """(images, question, target) of sample `index` of an embedded (local lmms-eval) task, through the task's
    own `doc_to_visual` / `doc_to_text` / `doc_to_target`."""
    import pyarrow.parquet as pq

    from vlcache.eval.tasks import task_dir

    if dataset.get("source") != "embedded":
        raise ValueError(f"dataset {dataset.get('name')!r} is not an embedded task: load its image and "
                         "question yourself and call kept_patches_for_sample(adapter, policy, image, "
                         "question)")
    folder = task_dir(dataset) / dataset["task"]
    parquet = next(iter(sorted(folder.glob("*.parquet"))), None)
    if parquet is None:
        raise FileNotFoundError(f"no parquet data in {folder}")
    spec = importlib.util.spec_from_file_location(f"_vlcache_task_{dataset['task']}", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {k: _decode_images(v) for k, v in pq.read_table(parquet).slice(index, 1).to_pylist()[0].items()}
    target = utils.doc_to_target(doc) if hasattr(utils, "doc_to_target") else doc.get("answer")
    return list(utils.doc_to_visual(doc)), utils.doc_to_text(doc), target


def kept_patches_for_job(job_dir: str | Path, index: int = 0, device: str = "cpu",
                         max_new_tokens: int = 16) -> KeptPatches:
    """Reruns sample `index` of a job (its config.yaml: model, policy, budget, dataset) and returns what the
    kept-patches figure needs."""
    import torch
    import yaml

    from vlcache.models.load import load_model
    from vlcache.policies.policy import build_policy

    cfg = yaml.safe_load((Path(job_dir) / "config.yaml").read_text())
    adapter = load_model(cfg["model"], torch.device(device), cfg.get("seed", 0))
    policy = build_policy(cfg["policy"], float(cfg["budget"]))
    images, question, _ = sample_from_task(cfg["dataset"], index)
    return kept_patches_for_sample(adapter, policy, images, question, max_new_tokens)


def pick_job(jobs, prefer: Sequence[str] = ("vlcache", "snapkv", "h2o", "pyramidkv", "streamingllm")):
    """A finished job worth drawing: the first preferred policy present, at its smallest budget below 100%
    (the most compressed cache); any finished job when none compresses."""
    ok = jobs[jobs["status"] == "ok"]
    if ok.empty:
        raise ValueError("no finished job in these results")
    for policy in [*prefer, *sorted(set(ok["policy"]) - set(prefer) - {"full"})]:
        rows = ok[(ok["policy"] == policy) & (ok["budget"] < 1)]
        if len(rows):
            return rows.sort_values("budget").iloc[0]
    return ok.iloc[0]
