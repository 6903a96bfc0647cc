"""Trains the embedded LLaVA (vlcache/zoo/checkpoint) on the four synthetic tasks' training streams.

    # on a GPU: train for a time budget, then evaluate greedily on the test splits (see vlcache/zoo/README.md
    # for the runs behind the shipped checkpoint)
    python -m vlcache.zoo.train --device cuda --minutes 9 --save-predecay --out /tmp/run1
    # continue from the weights saved where the first run's decay began, with new training samples
    python -m vlcache.zoo.train --device cuda --minutes 9 --resume /tmp/run1/model_predecay.safetensors \
        --start 20000000 --warmup 100 --out /tmp/run2
    # write the shipped checkpoint folder (fp16 weights, processor, tokenizer, chat template)
    python -m vlcache.zoo.train --export /tmp/run2 --to vlcache/zoo/checkpoint

Training samples come from the generators in vlcache.data with training seeds (render.sample_seed), which
never meet the test seeds; any training sample whose content key equals a test sample's is skipped as well.
Batches hold one task each (single-image tasks share a prompt length, so little padding), are generated
and tokenised in DataLoader workers, and carry uint8 pixels that the GPU normalises as the CLIP processor
does. The whole model (vision tower, projector, language model) is trained from scratch with the answer
tokens (and the end-of-sequence token) as targets, under bf16 autocast, with AdamW on a time-based
warmup-stable-decay schedule; the vision tower's position embeddings start from a 2-D sine-cosine table.
A share of synth_docvqa batches uses shorter forms (a curriculum, --easy-docvqa) and, optionally, asks to
read the whole form (--docvqa-read). The prompt is exactly the framework's: the chat template of
vlcache.zoo.processor with 576 image tokens per image, then " {answer}</s>" as the assistant's turn.

Optionally (--aux-ocr, --aux-shapes; off by default) a dense auxiliary loss trains the image features directly:
the generators also return a class for each of an image's 576 patches (`labels=True`: the character printed in
that cell of a synth_docvqa form, or the (colour, shape) covering the patch in the shape tasks, or blank), and a
linear head (`AuxHead`) on the projector's output (what the language model sees; --aux-at vision: its input)
learns to predict it; --aux-center also penalises image features that are mostly one vector common to all
patches (common_logodds), which the language model, normalising each token, can hardly tell apart. The head is a
separate module, saved apart (aux_head.safetensors), never in the model's weights or the exported checkpoint; a
run resumed from weights without it starts a fresh one.

A curriculum for reading (also training-only, off by default; vlcache/zoo/README.md, "Session 4"): --text-grid gives
a share of the forms as text, each image token replaced by the character in its cell (text_grid_ids); --align pulls
the projector's output on a form towards the language model's embeddings of those characters (align_loss); --copy
adds text-only induction batches (copy_batch), which a 6-layer model needed before it could look a value up;
--freeze-lm trains the vision tower and the projector only, under a language model that already reads. --align
turned out to collapse the features onto the space's embedding; --align-ce (align_ce_loss) reads each cell's
character from its feature's cosine with those embeddings instead, and --grid-mix (GridMix) starts the forms as
text and moves them to the image features by degrees. --aux-index (ImageIndexHead) teaches each image token of a
multi-image prompt which image it is in.

Imports only torch, transformers, tokenizers, numpy, PIL and safetensors (plus vlcache.data's generators),
so that it runs on the GPU machines, which lack lmms-eval and datasets.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlcache.data import generators
from vlcache.data.metrics import exact_match, first_number
from vlcache.data.render import CELL_BLANK, CHAR_FIRST, CHAR_LAST, NUM_CELL_CLASSES, TASKS, TEST_SIZES
from vlcache.zoo.model import TRAINED_SPEC, TinyLlavaSpec, tiny_llava_config
from vlcache.zoo.processor import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

IMAGE_TOKENS = 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS = {"synth_docvqa": 0.3, "synth_caption": 0.2, "synth_count": 0.25, "synth_multi": 0.25}
MAX_NEW_TOKENS = {"synth_docvqa": 16, "synth_caption": 112, "synth_count": 4, "synth_multi": 4}
CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
READ_QUESTION = "Read the form."  # training-only auxiliary question on synth_docvqa forms (--docvqa-read)
# fixed training lengths under --compile: one image (<= 613 prompt + 108 answer tokens), four labelled images (<= 2400)
PAD_TO = {"synth_docvqa": 736, "synth_caption": 736, "synth_count": 736, "synth_multi": 2432}
AUX_HEAD_FILE = "aux_head.safetensors"  # the auxiliary head's weights (training only)


def images_of(sample: dict) -> list:
    return sample["images"] if "images" in sample else [sample["image"]]


class Encoder:
    """Token ids of prompts and answers, as the framework's adapter and processor build them."""

    def __init__(self) -> None:
        self.tok = build_tokenizer()
        self.image_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_id, self.pad_id = self.tok.eos_token_id, self.tok.pad_token_id
        chars = [" "] + [chr(c) for c in range(CHAR_FIRST, CHAR_LAST + 1)]
        self._grid_table = torch.tensor(self.tok.convert_tokens_to_ids(chars))

    def prompt_ids(self, question: str, num_images: int) -> list[int]:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=CHAT_TEMPLATE,
            add_generation_prompt=True,
            tokenize=False,
        )
        return self.tok(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * IMAGE_TOKENS), add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok(" " + answer, add_special_tokens=False)["input_ids"] + [self.eos_id]

    def grid_table(self) -> torch.Tensor:
        """`[95]` token id of each character cell class (render.char_class; the blank cell: the space)."""
        return self._grid_table

    def decode(self, ids: list[int]) -> str:
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)


def pixels_uint8(samples: list[dict]) -> torch.Tensor:
    """`[N, 336, 336, 3]` uint8, the images of all samples in order."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for s in samples for im in images_of(s)]
    return torch.from_numpy(np.stack(arrays))


def cells_of(samples: list[dict]) -> torch.Tensor:
    """`[N, 576]` uint8 per-patch classes of all samples' images in order (the generators' `labels=True`)."""
    grids = [g for s in samples for g in (s["cells"] if s["cells"].ndim == 3 else [s["cells"]])]
    return torch.from_numpy(np.stack(grids).reshape(len(grids), -1))


def normalise(pixels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 `[N, H, W, 3]` to CLIP's normalised `[N, 3, H, W]` (what CLIPImageProcessor gives a 336 px image)."""
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).to(dtype)


def training_batch(enc: Encoder, samples: list[dict], pad_to: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ids and labels (-100 on the prompt and the padding), and the images' uint8 pixels.

    `pad_to` > 0 pads to that length (a fixed shape per task, for torch.compile)."""
    seqs, labs = [], []
    for s in samples:
        p, a = enc.prompt_ids(s["question"], len(images_of(s))), enc.answer_ids(s["answer"])
        seqs.append(p + a)
        labs.append([-100] * len(p) + a)
    n = max(max(map(len, seqs)), pad_to)
    ids = torch.full((len(seqs), n), enc.pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(lab)] = torch.tensor(lab)
    out = {"input_ids": ids, "labels": labels, "pixels": pixels_uint8(samples)}
    if all("cells" in s for s in samples):
        out["cells"] = cells_of(samples)
    return out


def test_keys() -> dict[str, set[str]]:
    gen = generators()
    return {t: {gen[t]("test", i)["key"] for i in range(TEST_SIZES[t])} for t in TASKS}


class TrainStream(IterableDataset):
    """Endless batches, one task each; worker w of W draws training indices start + w, start + w + W, ..."""

    def __init__(
        self,
        batch_sizes: dict[str, int],
        start: int,
        exclude: dict[str, set[str]],
        seed: int = 0,
        weights: dict[str, float] | None = None,
        pad_to: dict[str, int] | None = None,
        easy_docvqa: float = 0.0,
        docvqa_read: float = 0.0,
        labels: tuple[str, ...] = (),
        text_grid: float = 0.0,
    ):
        self.batch_sizes, self.start, self.exclude, self.seed = batch_sizes, start, exclude, seed
        self.weights, self.pad_to, self.easy_docvqa = weights or WEIGHTS, pad_to or {}, easy_docvqa
        self.docvqa_read, self.labels = docvqa_read, tuple(labels)  # labels: tasks whose batches carry "cells"
        self.text_grid = text_grid

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.seed * 1009 + wid)
        gen, enc = generators(), Encoder()
        nxt = {t: self.start + wid for t in TASKS}
        tasks = [t for t in TASKS if self.batch_sizes.get(t)]
        while True:
            task = rng.choices(tasks, weights=[self.weights[t] for t in tasks])[0]
            read = task == "synth_docvqa" and rng.random() < self.docvqa_read
            samples, kw = [], {"labels": True} if task in self.labels else {}
            while len(samples) < self.batch_sizes[task]:
                if task == "synth_docvqa" and rng.random() < self.easy_docvqa:
                    s = gen[task]("train", nxt[task], fields=(1, 4), **kw)  # curriculum: short forms
                else:
                    s = gen[task]("train", nxt[task], **kw)
                nxt[task] += nw
                if s["key"] in self.exclude[task]:
                    continue
                if read:  # the auxiliary reading task: the whole form's text, line by line
                    s = {**s, "question": READ_QUESTION, "answer": s["transcript"]}
                samples.append(s)
            batch = training_batch(enc, samples, self.pad_to.get(task, 0))
            batch["read"] = read
            batch["grid"] = task == "synth_docvqa" and rng.random() < self.text_grid
            if batch["grid"]:
                batch["input_ids"] = text_grid_ids(batch["input_ids"], batch["cells"], enc)
            yield task, batch


def text_grid_ids(ids: torch.Tensor, cells: torch.Tensor, enc: Encoder) -> torch.Tensor:
    """The form as text (--text-grid, training only): each image token becomes the token of the character printed
    in its cell (the space where blank), in the image tokens' row-major order, so the language model reads the
    same 24 x 24 layout at the same positions as characters. One image per sample (synth_docvqa)."""
    mask = ids == enc.image_id
    if int(mask.sum()) != cells.numel():
        raise ValueError(f"{int(mask.sum())} image tokens for {cells.numel()} cells")
    out = ids.clone()
    out[mask] = enc.grid_table()[cells.long().reshape(-1)]
    return out


def copy_batch(enc: Encoder, batch: int, length: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A text-only induction batch (--copy, training only): `<s>` S `\n` S `</s>` for random strings S of `length`
    printable characters, the loss on the repeat. Copying a string seen earlier in the context is what reading a
    value off a form needs, and the answer tokens of the four tasks supervise it too sparsely to learn it."""
    chars = enc.grid_table()[1:]  # the printable characters but the space
    body = chars[torch.randint(len(chars), (batch, length), generator=gen)]
    col = lambda i: torch.full((batch, 1), i)  # noqa: E731
    newline = enc.tok.convert_tokens_to_ids("\n")
    ids = torch.cat([col(enc.tok.bos_token_id), body, col(newline), body, col(enc.eos_id)], 1)
    labels = ids.clone()
    labels[:, : length + 2] = -100
    return {"input_ids": ids, "labels": labels, "pixels": None}


def align_loss(feats: torch.Tensor, cells: torch.Tensor, embed: torch.nn.Embedding, table: torch.Tensor):
    """Distance of the image features of a form (`[images, 576, dim]`) from the language model's own embeddings of
    the characters printed in their cells (`--align`, training only), relative to the embeddings' energy: the
    projector learns to hand the language model a form as the characters it reads in --text-grid batches."""
    target = embed(table[cells.long()]).detach().float()
    return (feats.float() - target).pow(2).mean() / target.pow(2).mean()


def align_ce_loss(
    feats: torch.Tensor, cells: torch.Tensor, embed: torch.nn.Embedding, table: torch.Tensor, tau: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced cross-entropy of each cell's character from the cosine of its image feature with the language
    model's embeddings of all the grid's characters, at temperature `tau` (`--align-ce`, training only), and the
    accuracy on the drawn (not blank) cells.

    Why not `align_loss`: regressing onto the embeddings lets the features collapse onto the space's embedding,
    which is most cells' target: on the pre-decay weights of runs F, G and H, a linear probe reads 0, 0.5 and 11 % of
    the drawn characters from the projector's output, against 97 % on run D's, trained with the aux head
    (experiments/zoo_probes.py forms, CPU, 8 forms). A classifier whose weights are the LM's own (fixed)
    embeddings keeps every character apart and points each feature where the language model reads that
    character; the language model normalises each token, so the direction is what it reads. Blank and drawn
    cells weigh half each, as in `aux_loss`."""
    tokens = table.unique()  # the grid's characters, the space included
    target = torch.searchsorted(tokens, table[cells.long()]).reshape(-1)
    weight = torch.nn.functional.normalize(embed.weight.detach()[tokens].float(), dim=-1)
    x = torch.nn.functional.normalize(feats.float().reshape(-1, feats.shape[-1]), dim=-1)
    logits = x @ weight.T / tau
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    drawn = cells.reshape(-1) != CELL_BLANK
    n_drawn, n_blank = drawn.sum().clamp(min=1), (~drawn).sum().clamp(min=1)
    loss = 0.5 * ((ce * drawn).sum() / n_drawn + (ce * ~drawn).sum() / n_blank)
    acc = ((logits.argmax(-1) == target) & drawn).sum() / n_drawn
    return loss, acc.detach()


class GridMix:
    """`--grid-mix A` (training only): a forward hook on the projector that hands the language model
    `alpha * E[c] + (1 - alpha) * f` on a form's image tokens, E[c] its embeddings of the cells' characters and f
    the image features, with `alpha` falling from A to 0 over the first `--mix-frac` of the run. At A = 1 the
    model starts on the forms as text (which run H's language model reads), and the answer loss moves it to the
    image features by degrees instead of at once. `set(alpha, target)` before a forward pass; `set(0, None)` for
    batches that are not forms. Registered after `FeatureTap`, so the tap keeps the unmixed features."""

    def __init__(self, model):
        self.alpha, self.target = 0.0, None
        self.handle = model.model.multi_modal_projector.register_forward_hook(self._hook)

    def set(self, alpha: float, target: torch.Tensor | None) -> None:
        self.alpha, self.target = alpha, target

    def _hook(self, module, inputs, output):
        if self.target is None or self.alpha <= 0:
            return None
        return self.alpha * self.target.to(output.dtype) + (1 - self.alpha) * output

    def remove(self) -> None:
        self.handle.remove()


def mix_alpha(start: float, progress: float, frac: float) -> float:
    """GridMix's alpha at `progress` (0..1) of the time budget: linear from `start` to 0 at `frac`."""
    return 0.0 if frac <= 0 else start * max(0.0, 1.0 - progress / frac)


def image_numbers(ids: torch.Tensor, image_id: int) -> torch.Tensor:
    """The image (0 for the first) of each image token of `ids`, in the order of `ids[ids == image_id]`."""
    image = ids == image_id
    return ((image.cumsum(1) - 1) // IMAGE_TOKENS)[image]


class ImageIndexHead(torch.nn.Module):
    """`--aux-index W` (training only): a linear head on the language model's hidden states after decoder layer
    `--index-layer`, at every image token of a multi-image prompt, trained to name the image the token belongs to.

    synth_multi's answer takes two hops: each image token must carry its image's number (from the "Image k:"
    label before it), then the last token finds the asked-for object and reads that number. On run J's weights a
    linear probe reads the image's number from the image tokens' hidden states after layers 1-5 at 53-58 % (chance
    25 %; experiments/zoo_probes.py multi, CPU, 12 prompts): the first hop is missing, and the answer's one token
    supervises it too sparsely. Zero-initialised (the uniform guess); the loss is a cross-entropy over the image
    tokens."""

    def __init__(self, model, layer: int, max_images: int = 8):
        super().__init__()
        text = model.model.language_model
        if not 1 <= layer <= len(text.layers):
            raise ValueError(f"--index-layer {layer}: the language model has layers 1..{len(text.layers)}")
        self.proj = torch.nn.Linear(text.config.hidden_size, max_images)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)
        self.hidden = None
        self.handle = text.layers[layer - 1].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def loss(self, ids: torch.Tensor, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy, accuracy) of the image number at the image tokens of `ids` (the last forward pass)."""
        hidden, self.hidden = self.hidden, None
        image = ids == image_id
        target = image_numbers(ids, image_id)
        logits = self.proj(hidden[image].float())
        ce = torch.nn.functional.cross_entropy(logits, target)
        return ce, (logits.argmax(-1) == target).float().mean().detach()

    def remove(self) -> None:
        self.handle.remove()


class AuxHead(torch.nn.Module):
    """The auxiliary loss's head (training only): one linear map, zero-initialised (the uniform guess, so that a
    fresh head sends no large gradients into a trained model), from a patch's feature less the batch's mean
    feature, divided by the batch's root-mean-square deviation from it (one number for all channels).

    Why not the per-token normalised feature, what the language model reads: on a form, the run-B projector
    outputs a vector common to all patches (norm about 275) plus a patch-specific part of norm about 1.6, which
    carries the characters, and a head on the normalised features learns nothing from a part that small (CPU,
    frozen features: 0 % of the characters after 300 steps; less the mean: 22 %). The statistics are
    differentiated, so the loss does not change when all features are scaled: holding the scale constant instead
    rewards ever larger features, and such runs diverged on the CPU (so did dividing each channel by its own
    deviation). Making the patch-specific part a larger share of what the language model reads is `common_logodds`'s
    job (--aux-center)."""

    def __init__(self, dim: int, classes: int = NUM_CELL_CLASSES):
        super().__init__()
        self.proj = torch.nn.Linear(dim, classes)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.float()
        centred = x - x.reshape(-1, x.shape[-1]).mean(0)
        return self.proj(centred / (centred.pow(2).mean().sqrt() + 1e-6))


def common_logodds(feats: torch.Tensor) -> torch.Tensor:
    """log(|m|^2 / mean |x - m|^2) over the image features x of the batch, m their mean: how much the vector that
    all patches share outweighs what tells them apart. The language model normalises each token (RMSNorm), so at
    large values (9.2 for the run-B projector on forms: m 275, x - m 1.6) every image token reads nearly the same;
    `--aux-center` penalises it above 0 (half the energy common), and does nothing below (shape images: about -3)."""
    x = feats.float().reshape(-1, feats.shape[-1])
    mean = x.mean(0)
    return torch.log(mean.pow(2).sum() + 1e-12) - torch.log((x - mean).pow(2).sum(1).mean() + 1e-12)


class FeatureTap:
    """A forward hook on the LLaVA projector that keeps the last forward pass's image features, with their graph,
    `[images, 576, dim]`: the projector's output (`where="projector"`) or its input ("vision": the vision tower's
    selected features)."""

    def __init__(self, model, where: str = "projector"):
        if where not in ("projector", "vision"):
            raise ValueError(f"where must be 'projector' or 'vision', not {where!r}")
        self.where, self.feats = where, None
        config = model.config
        self.dim = (config.text_config if where == "projector" else config.vision_config).hidden_size
        self.handle = model.model.multi_modal_projector.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.feats = output if self.where == "projector" else inputs[0]

    def pop(self) -> torch.Tensor | None:
        feats, self.feats = self.feats, None
        return feats

    def remove(self) -> None:
        self.handle.remove()
        self.feats = None


def aux_loss(logits: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced cross-entropy of the per-patch classes, and the accuracy on the drawn (not blank) patches.

    `logits`: `[images, 576, classes]`; `cells`: `[images, 576]`. Blank patches outnumber drawn ones (about three
    to one on a form, ten to one in a shape scene), so the loss is the mean of the blank and the drawn patches'
    mean cross-entropies: the drawn ones keep half the weight however few they are."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    cells = cells.reshape(-1).long()
    ce = torch.nn.functional.cross_entropy(logits, cells, reduction="none")
    drawn = cells != CELL_BLANK
    n_drawn, n_blank = drawn.sum().clamp(min=1), (~drawn).sum().clamp(min=1)
    loss = 0.5 * ((ce * drawn).sum() / n_drawn + (ce * ~drawn).sum() / n_blank)
    acc = ((logits.argmax(-1) == cells) & drawn).sum() / n_drawn
    return loss, acc.detach()


def forms_labelled(args) -> bool:
    """Whether synth_docvqa batches need their cells' classes (the options that read them)."""
    return args.text_grid > 0 or args.align > 0 or args.align_ce > 0 or args.grid_mix > 0


def aux_weights(ocr: float, shapes: float) -> dict[str, float]:
    """The auxiliary loss's weight per task (0: no labels made)."""
    w = {"synth_docvqa": ocr, "synth_caption": shapes, "synth_count": shapes, "synth_multi": shapes}
    return {t: v for t, v in w.items() if v > 0}


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """`[grid * grid, dim]` 2-D sine-cosine embedding (half the channels for the row, half for the column)."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    idx = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(idx, idx, indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, 1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


def build_model(spec: TinyLlavaSpec, enc: Encoder, init_range: float = 0.06, pos_init: str = "sincos"):
    """A fresh model. `pos_init="sincos"` starts the vision tower's learned position embeddings from a 2-D
    sine-cosine table (rows and columns of the 24 x 24 patch grid; the class token's row zero), scaled to the
    patch embeddings' size, so that row and column are features from the first step (as MAE initialises)."""
    from transformers import LlavaForConditionalGeneration

    config = tiny_llava_config(spec, len(enc.tok), enc.image_id, enc.pad_id)
    config.text_config.initializer_range = init_range
    model = LlavaForConditionalGeneration(config)
    if pos_init == "sincos":
        emb = model.model.vision_tower.embeddings.position_embedding.weight
        grid = int(round((emb.shape[0] - 1) ** 0.5))
        with torch.no_grad():
            emb[0].zero_()
            emb[1:] = 0.5 * sincos_2d(grid, emb.shape[1])
    return model


def load_weights(model, run_dir: Path) -> None:
    from safetensors.torch import load_file

    path = run_dir if run_dir.is_file() else run_dir / "model_fp32.safetensors"
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {missing}, unexpected {unexpected}")


def lr_at(
    step: int,
    progress: float,
    peak: float,
    warmup: int,
    schedule: str = "cosine",
    floor: float = 0.05,
    decay_frac: float = 0.3,
) -> float:
    """Linear warmup over `warmup` steps, then cosine to `floor` x peak over the time budget, or (wsd) flat
    and then linear to `floor` x peak over the last `decay_frac` of the budget (0: flat to the end)."""
    warm = min(1.0, (step + 1) / warmup)
    progress = min(progress, 1.0)
    if schedule == "wsd":
        start = 1.0 - decay_frac
        decay = 0.0 if progress < start or decay_frac <= 0 else (progress - start) / decay_frac
        return peak * warm * (1 - (1 - floor) * decay)
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    enc = Encoder()
    spec = TinyLlavaSpec(**json.loads(args.spec)) if args.spec else TRAINED_SPEC
    model = build_model(spec, enc, args.init_range, args.pos_init)
    if args.resume:
        load_weights(model, Path(args.resume))
        log(f"resumed from {args.resume}")
    model.to(device).train()
    nparams = sum(p.numel() for p in model.parameters())
    log(
        f"spec {spec} params {nparams / 1e6:.2f}M device {device} "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}"
    )
    aux_w = aux_weights(args.aux_ocr, args.aux_shapes)
    tap, head = None, None
    if aux_w or args.aux_center > 0 or args.align > 0 or args.align_ce > 0:
        tap = FeatureTap(model, args.aux_at)
    index_head = ImageIndexHead(model, args.index_layer).to(device) if args.aux_index > 0 else None
    mixer = GridMix(model) if args.grid_mix > 0 else None  # after the tap: the tap keeps the unmixed features
    if aux_w:  # the dense auxiliary loss: a head outside the model, on the image features
        head = AuxHead(tap.dim).to(device).train()
        prev = aux_head_path(Path(args.resume)) if args.resume else None
        if prev is not None and prev.exists():
            load_aux_head(head, prev)
            log(f"aux head from {prev}")
        log(f"aux loss on the {args.aux_at} features ({tap.dim} -> {NUM_CELL_CLASSES} classes), weights {aux_w}")
    if args.aux_center > 0:
        log(f"common-part loss on the {args.aux_at} features, weight {args.aux_center}")
    if args.freeze_lm and (args.text_grid > 0 or args.copy > 0):
        raise ValueError(
            f"--freeze-lm trains the image path, which --text-grid ({args.text_grid}) and --copy ({args.copy}) "
            "batches never reach: set them to 0"
        )
    if args.freeze_lm:  # the language model (embeddings and head included) keeps its weights: the image path learns
        for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]:
            p.requires_grad_(False)
        log("language model frozen: training the vision tower and the projector")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trained += [(f"aux.{n}", p) for n, p in head.named_parameters()] if head else []
    trained += [(f"index.{n}", p) for n, p in index_head.proj.named_parameters()] if index_head else []

    decay = [p for n, p in trained if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trained if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    t0 = time.time()
    exclude = test_keys()
    log(f"test keys {sum(map(len, exclude.values()))} ({time.time() - t0:.1f}s)")
    sizes = {t: args.batch for t in TASKS}
    sizes["synth_multi"] = max(1, args.batch // 4)
    if args.tasks:
        sizes = {t: (b if t in args.tasks.split(",") else 0) for t, b in sizes.items()}
    weights = {**WEIGHTS, **json.loads(args.weights)} if args.weights else WEIGHTS
    pad_to = PAD_TO if args.compile else None
    stream = TrainStream(
        sizes,
        start=args.start,
        exclude=exclude,
        seed=args.seed,
        weights=weights,
        pad_to=pad_to,
        easy_docvqa=args.easy_docvqa,
        docvqa_read=args.docvqa_read,
        labels=tuple(aux_w) + (("synth_docvqa",) if forms_labelled(args) else ()),
        text_grid=args.text_grid,
    )
    table = enc.grid_table().to(device)
    forward = model
    if args.compile:
        forward = torch.compile(model, dynamic=False)
    log(f"args {vars(args)}")
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
        persistent_workers=False,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    budget = args.minutes * 60
    # per logged kind of batch (the tasks, and synth_docvqa's reading batches): sums of the LM loss, the aux loss,
    # the aux accuracy and common_logodds, on the device (no sync per step), and the batch count
    kinds = (*TASKS, "read", "grid", "grid-read", "copy")
    stats = {k: [0.0, 0] for k in kinds}
    losses = {k: torch.zeros(7, device=device) for k in kinds}
    params = [p for _, p in trained]
    step, t_start, t_wait, saved_predecay, skipped = 0, time.time(), 0.0, False, 0
    t_fetch = time.time()
    copy_gen = torch.Generator().manual_seed(args.seed + 17)
    for task, batch in loader:
        t_wait += time.time() - t_fetch
        if args.copy > 0 and torch.rand((), generator=copy_gen) < args.copy:
            length = int(torch.randint(16, 257, (), generator=copy_gen))
            task, batch = "copy", copy_batch(enc, args.batch, length, copy_gen)
        elapsed = time.time() - t_start
        if elapsed > budget or (args.steps and step >= args.steps):
            break
        lr = lr_at(step, elapsed / budget, args.lr, args.warmup, args.schedule, decay_frac=args.decay_frac)
        if args.save_predecay and not saved_predecay and elapsed / budget >= 1 - args.decay_frac:
            save_run(model, out, "model_predecay.safetensors", config=False)  # to resume at the flat rate
            saved_predecay = True
            log(f"saved the pre-decay weights at step {step}")
        for g in opt.param_groups:
            g["lr"] = lr
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        grid = batch.get("grid", False)
        pixels = None if grid else batch["pixels"]
        pixel_values = None if pixels is None else normalise(pixels.to(device, non_blocking=True))
        kind = ("grid-read" if grid else "read") if batch.get("read") else "grid" if grid else task
        aux, acc, common, align, index_ce, index_acc = (torch.zeros((), device=device) for _ in range(6))
        cells = batch["cells"].to(device, non_blocking=True) if "cells" in batch else None
        if mixer is not None:
            alpha = mix_alpha(args.grid_mix, elapsed / budget, args.mix_frac) if task == "synth_docvqa" else 0.0
            target = None
            if alpha > 0 and pixels is not None:
                target = model.get_input_embeddings()(table[cells.long()]).detach()
            mixer.set(alpha, target)
        try:
            with autocast:
                loss = forward(input_ids=ids, pixel_values=pixel_values, labels=labels, use_cache=False).loss
                feats = tap.pop() if tap else None
                total = loss
                if feats is not None and task == "synth_docvqa" and args.align > 0:
                    align = align_loss(feats, cells, model.get_input_embeddings(), table)
                    total = total + args.align * align
                if feats is not None and task == "synth_docvqa" and args.align_ce > 0:
                    ce, acc = align_ce_loss(feats, cells, model.get_input_embeddings(), table)
                    total = total + args.align_ce * ce
                    aux = ce.detach()
                if feats is not None and task in aux_w:
                    aux, acc = aux_loss(head(feats), cells)
                    total = total + aux_w[task] * aux
                if index_head is not None and task == "synth_multi":
                    index_ce, index_acc = index_head.loss(ids, enc.image_id)
                    total = total + args.aux_index * index_ce
                if feats is not None:
                    common = common_logodds(feats)
                    if args.aux_center > 0:
                        total = total + args.aux_center * torch.relu(common)
            total.backward()
        except Exception as e:  # a compile failure: carry on eagerly
            if forward is model:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager from now on")
            forward = model
            opt.zero_grad(set_to_none=True)
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if not torch.isfinite(norm):  # one sync a step: a bad batch is skipped, not written into every weight
            skipped += 1
            opt.zero_grad(set_to_none=True)
            if skipped > 100:
                raise RuntimeError(f"{skipped} steps with a non-finite gradient, the last at step {step}")
            t_fetch = time.time()
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[kind] += torch.stack(
            [loss.detach().float(), aux.detach().float(), acc.float(), common.detach().float(), align.detach().float(),
             index_ce.detach().float(), index_acc.float()]
        )
        stats[kind][1] += 1
        step += 1
        if step in (3, 20) or step % args.log_every == 0:
            parts = []
            for k in kinds:
                if stats[k][1]:
                    lm, ax, ac, sh, al, ix, ixa = (losses[k] / stats[k][1]).tolist()
                    ce_kind = args.align_ce > 0 and k in ("synth_docvqa", "read")  # aux/acc hold align_ce's
                    more = [f"aux {ax:.3f} acc {ac:.2f}"] if head and ax and not ce_kind else []
                    more += [f"common {sh:.2f}"] if tap and k not in ("grid", "grid-read", "copy") else []
                    more += [f"align {al:.3f}"] if al else []
                    more += [f"index {ix:.3f} acc {ixa:.2f}"] if index_head and k == "synth_multi" else []
                    more += [f"ce {ax:.3f} acc {ac:.2f}"] if ce_kind else []
                    parts.append(f"{k.removeprefix('synth_')} {lm:.3f}" + (f" ({' '.join(more)})" if more else ""))
                    losses[k].zero_(), stats[k].__setitem__(1, 0)
            mix = f" mix {mix_alpha(args.grid_mix, elapsed / budget, args.mix_frac):.2f}" if mixer else ""
            log(f"step {step} t {elapsed:.0f}s lr {lr:.2e}{mix} data-wait {t_wait:.0f}s | " + " ".join(parts))
        t_fetch = time.time()
    train_s = time.time() - t_start
    log(f"trained {step} steps in {train_s:.0f}s (data wait {t_wait:.0f}s, {skipped} skipped: non-finite gradient)")
    del loader
    save_run(model, out, config=not args.no_config)
    if mixer:
        mixer.remove()
    if index_head:
        index_head.remove()
    if tap:
        tap.remove()  # the model alone from here: evaluation and the exported weights never see the head
    if head:
        save_aux_head(head, out / AUX_HEAD_FILE)
    results = evaluate(model.eval(), enc, device, n=args.eval_n, log=log)
    results.update(
        steps=step,
        train_seconds=round(train_s),
        params=nparams,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    log(json.dumps(results))


def save_run(model, out: Path, name: str = "model_fp32.safetensors", config: bool = True) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / name))
    if config:
        (out / "config.json").write_text(model.config.to_json_string())


def aux_head_path(resume: Path) -> Path:
    """Where a run's auxiliary head sits: next to the weights file, or in the run folder."""
    return (resume.parent if resume.is_file() else resume) / AUX_HEAD_FILE


def save_aux_head(head: AuxHead, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))


def load_aux_head(head: AuxHead, path: Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(path)))


def anls_score(pred: str, answers: list[str], threshold: float = 0.5) -> float:
    """ANLS as lmms-eval computes it (used here only for the training log; the shipped task uses lmms-eval's)."""

    def lev(a: str, b: str) -> int:
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    best = 0.0
    for ans in answers:
        g, p = " ".join(ans.strip().lower().split()), " ".join(pred.strip().lower().split())
        length = max(len(ans), len(p))  # lengths after collapsing blanks (vlcache.data.metrics.anls)
        best = max(best, 0.0 if length == 0 else 1 - lev(g, p) / length)
    return best if best >= threshold else 0.0


def score(task: str, pred: str, sample: dict) -> float:
    if task == "synth_docvqa":
        return anls_score(pred, sample["answers"])
    if task == "synth_caption":
        return exact_match(pred, sample["answer"])
    return float(first_number(pred) == sample["answer"])


@torch.no_grad()
def greedy(model, enc: Encoder, samples: list[dict], device, max_new_tokens: int) -> list[str]:
    """Full-cache greedy decoding of a left-padded batch with explicit positions (as the framework's engine)."""
    from transformers import DynamicCache

    prompts = [enc.prompt_ids(s["question"], len(images_of(s))) for s in samples]
    m = max(map(len, prompts))
    ids = torch.full((len(prompts), m), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), m), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, m - len(p) :] = torch.tensor(p)
        mask[i, m - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    dtype = next(model.parameters()).dtype
    pv = normalise(pixels_uint8(samples).to(device), dtype)
    cache = DynamicCache()
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        pixel_values=pv,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    lengths = mask.sum(1)
    tok = logits.argmax(-1)
    steps, done = [tok], tok == enc.eos_id
    while len(steps) < max_new_tokens and not bool(done.all()):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=lengths[:, None],
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        lengths = lengths + 1
        tok = torch.where(done, enc.pad_id, logits.argmax(-1))
        done |= tok == enc.eos_id
        steps.append(tok)
    return [enc.decode(seq) for seq in torch.stack(steps, 1).tolist()]


def evaluate(model, enc: Encoder, device, n: int | None = None, batch: int = 32, log=print) -> dict:
    """Greedy full-cache scores on the test splits (regenerated: identical to the shipped parquet files)."""
    gen = generators()
    results = {}
    for task in TASKS:
        total = TEST_SIZES[task] if n is None else min(n, TEST_SIZES[task])
        samples = [gen[task]("test", i) for i in range(total)]
        bs = max(1, batch // 4) if task == "synth_multi" else batch
        scores, t0 = [], time.time()
        for k in range(0, total, bs):
            chunk = samples[k : k + bs]
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
            with autocast:
                preds = greedy(model, enc, chunk, device, MAX_NEW_TOKENS[task])
            scores += [score(task, p, s) for p, s in zip(preds, chunk)]
            if k == 0:
                for p, s in list(zip(preds, chunk))[:3]:
                    log(f"  {task} Q: {s['question']!r} ref: {s['answer']!r} pred: {p!r}")
        results[task] = round(sum(scores) / len(scores), 4)
        log(f"{task}: {results[task]:.4f} on {total} ({time.time() - t0:.1f}s)")
    return results


def export(run_dir: Path, to: Path, dtype: str = "float16") -> None:
    """The shipped checkpoint folder: config, weights in `dtype`, processor, tokenizer and chat template."""
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vlcache.zoo.processor import build_processor

    config = LlavaConfig.from_pretrained(str(run_dir))
    model = LlavaForConditionalGeneration(config)
    model.load_state_dict(load_file(str(run_dir / "model_fp32.safetensors")))
    model = model.to(getattr(torch, dtype)).eval()
    model.config.dtype = dtype
    to.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(to))
    build_processor().save_pretrained(str(to))
    print(f"exported {run_dir} to {to}: {sorted(p.name for p in to.iterdir())}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/zoo_train", help="run folder: weights, config, log, eval.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=9.0, help="training time budget (the schedule follows it)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: the time budget only)")
    p.add_argument("--batch", type=int, default=64, help="samples per single-image batch; synth_multi: a quarter")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--schedule", choices=("cosine", "wsd"), default="wsd")
    p.add_argument("--decay-frac", type=float, default=0.3, help="wsd: share of the budget spent decaying")
    p.add_argument("--init-range", type=float, default=0.06, help="std of the language model's initial weights")
    p.add_argument("--pos-init", choices=("sincos", "learned"), default="sincos")
    p.add_argument("--weights", default=None, help="JSON task -> share of batches (default: WEIGHTS)")
    p.add_argument("--easy-docvqa", type=float, default=0.3, help="share of synth_docvqa batches' forms with 1-4 lines")
    p.add_argument(
        "--docvqa-read",
        type=float,
        default=0.0,
        help="share of synth_docvqa batches asking 'Read the form.' (dense reading supervision)",
    )
    p.add_argument(
        "--aux-ocr",
        type=float,
        default=0.0,
        help="weight of the dense auxiliary loss on synth_docvqa batches: each patch's printed character",
    )
    p.add_argument(
        "--aux-shapes",
        type=float,
        default=0.0,
        help="weight of the dense auxiliary loss on the shape tasks' batches: each patch's colour and shape",
    )
    p.add_argument(
        "--aux-at",
        choices=("projector", "vision"),
        default="projector",
        help="the auxiliary head reads the projector's output (what the LM sees) or its input",
    )
    p.add_argument(
        "--aux-center",
        type=float,
        default=0.0,
        help="weight of a loss on how much the image features' common part outweighs the rest (common_logodds)",
    )
    p.add_argument(
        "--text-grid",
        type=float,
        default=0.0,
        help="share of synth_docvqa batches given as text: each image token replaced by its cell's character",
    )
    p.add_argument(
        "--align",
        type=float,
        default=0.0,
        help="weight of a loss pulling a form's image features to the LM's embeddings of its cells' characters",
    )
    p.add_argument(
        "--align-ce",
        type=float,
        default=0.0,
        help="weight of a cross-entropy reading each form cell's character from its feature's cosine with the "
        "LM's character embeddings (align_ce_loss)",
    )
    p.add_argument(
        "--grid-mix",
        type=float,
        default=0.0,
        help="start share of the LM's character embeddings mixed into a form's image features (GridMix)",
    )
    p.add_argument(
        "--aux-index",
        type=float,
        default=0.0,
        help="weight of a loss naming each image token's image in multi-image prompts (ImageIndexHead)",
    )
    p.add_argument("--index-layer", type=int, default=2, help="--aux-index reads the hidden states after this layer")
    p.add_argument("--mix-frac", type=float, default=0.5, help="share of the run over which --grid-mix falls to 0")
    p.add_argument(
        "--copy", type=float, default=0.0, help="share of steps on text-only induction batches (copy_batch)"
    )
    p.add_argument(
        "--freeze-lm",
        action="store_true",
        help="train the vision tower and the projector only (the language model's weights stay as resumed)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager)")
    p.add_argument("--workers", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first training index (a resumed run takes new samples)")
    p.add_argument("--resume", default=None, help="a run folder (or weights file) to start from")
    p.add_argument("--save-predecay", action="store_true", help="also save the weights where the decay starts")
    p.add_argument("--no-config", action="store_true", help="do not write config.json (rebuilt from --spec)")
    p.add_argument("--spec", default=None, help="JSON TinyLlavaSpec fields (default: model.TRAINED_SPEC)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of tasks to train on")
    p.add_argument("--eval-n", type=int, default=None, help="test samples per task to evaluate (default: all)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--export", default=None, help="a run folder to export as the shipped checkpoint")
    p.add_argument("--to", default=str(CHECKPOINT))
    args = p.parse_args(argv)
    if args.export:
        export(Path(args.export), Path(args.to))
    else:
        train(args)


if __name__ == "__main__":
    main()
