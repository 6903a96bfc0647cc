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
from vlcache.data.render import TASKS, TEST_SIZES
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


def images_of(sample: dict) -> list:
    return sample["images"] if "images" in sample else [sample["image"]]


class Encoder:
    """Token ids of prompts and answers, as the framework's adapter and processor build them."""

    def __init__(self) -> None:
        self.tok = build_tokenizer()
        self.image_id = self.tok.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_id, self.pad_id = self.tok.eos_token_id, self.tok.pad_token_id

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

    def decode(self, ids: list[int]) -> str:
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)


def pixels_uint8(samples: list[dict]) -> torch.Tensor:
    """`[N, 336, 336, 3]` uint8, the images of all samples in order."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for s in samples for im in images_of(s)]
    return torch.from_numpy(np.stack(arrays))


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
    return {"input_ids": ids, "labels": labels, "pixels": pixels_uint8(samples)}


def test_keys() -> dict[str, set[str]]:
    gen = generators()
    return {t: {gen[t]("test", i)["key"] for i in range(TEST_SIZES[t])} for t in TASKS}


class TrainStream(IterableDataset):
    """Endless batches, one task each; worker w of W draws training indices start + w, start + w + W, ..."""

    def __init__(self, batch_sizes: dict[str, int], start: int, exclude: dict[str, set[str]], seed: int = 0,
                 weights: dict[str, float] | None = None, pad_to: dict[str, int] | None = None,
                 easy_docvqa: float = 0.0, docvqa_read: float = 0.0):
        self.batch_sizes, self.start, self.exclude, self.seed = batch_sizes, start, exclude, seed
        self.weights, self.pad_to, self.easy_docvqa = weights or WEIGHTS, pad_to or {}, easy_docvqa
        self.docvqa_read = docvqa_read

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
            samples = []
            while len(samples) < self.batch_sizes[task]:
                if task == "synth_docvqa" and rng.random() < self.easy_docvqa:
                    s = gen[task]("train", nxt[task], fields=(1, 4))  # curriculum: short forms
                else:
                    s = gen[task]("train", nxt[task])
                nxt[task] += nw
                if s["key"] in self.exclude[task]:
                    continue
                if read:  # the auxiliary reading task: the whole form's text, line by line
                    s = {**s, "question": READ_QUESTION, "answer": s["transcript"]}
                samples.append(s)
            yield task, training_batch(enc, samples, self.pad_to.get(task, 0))


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


def lr_at(step: int, progress: float, peak: float, warmup: int, schedule: str = "cosine", floor: float = 0.05,
          decay_frac: float = 0.3) -> float:
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
    log(f"spec {spec} params {nparams / 1e6:.2f}M device {device} "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), fused=device.type == "cuda",
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
    stream = TrainStream(sizes, start=args.start, exclude=exclude, seed=args.seed, weights=weights, pad_to=pad_to,
                         easy_docvqa=args.easy_docvqa, docvqa_read=args.docvqa_read)
    forward = model
    if args.compile:
        forward = torch.compile(model, dynamic=False)
    log(f"args {vars(args)}")
    loader = DataLoader(
        stream, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None, persistent_workers=False,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    budget = args.minutes * 60
    stats = {t: [0.0, 0] for t in TASKS}
    losses = {t: torch.zeros((), device=device) for t in TASKS}
    step, t_start, t_wait, saved_predecay = 0, time.time(), 0.0, False
    t_fetch = time.time()
    for task, batch in loader:
        t_wait += time.time() - t_fetch
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
        pixel_values = normalise(batch["pixels"].to(device, non_blocking=True))
        try:
            with autocast:
                loss = forward(input_ids=ids, pixel_values=pixel_values, labels=labels, use_cache=False).loss
            loss.backward()
        except Exception as e:  # a compile failure: carry on eagerly
            if forward is model:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager from now on")
            forward = model
            opt.zero_grad(set_to_none=True)
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses[task] += loss.detach()
        stats[task][1] += 1
        step += 1
        if step in (3, 20) or step % args.log_every == 0:
            parts = []
            for t in TASKS:
                if stats[t][1]:
                    parts.append(f"{t[6:]} {losses[t].item() / stats[t][1]:.3f}")
                    losses[t].zero_(), stats[t].__setitem__(1, 0)
            log(f"step {step} t {elapsed:.0f}s lr {lr:.2e} data-wait {t_wait:.0f}s | " + " ".join(parts))
        t_fetch = time.time()
    train_s = time.time() - t_start
    log(f"trained {step} steps in {train_s:.0f}s (data wait {t_wait:.0f}s)")
    del loader
    save_run(model, out, config=not args.no_config)
    results = evaluate(model.eval(), enc, device, n=args.eval_n, log=log)
    results.update(steps=step, train_seconds=round(train_s), params=nparams,
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    log(json.dumps(results))


def save_run(model, out: Path, name: str = "model_fp32.safetensors", config: bool = True) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / name))
    if config:
        (out / "config.json").write_text(model.config.to_json_string())


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
        ids[i, m - len(p):] = torch.tensor(p)
        mask[i, m - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    dtype = next(model.parameters()).dtype
    pv = normalise(pixels_uint8(samples).to(device), dtype)
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, pixel_values=pv, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    lengths = mask.sum(1)
    tok = logits.argmax(-1)
    steps, done = [tok], tok == enc.eos_id
    while len(steps) < max_new_tokens and not bool(done.all()):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=lengths[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
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
    p.add_argument("--docvqa-read", type=float, default=0.0,
                   help="share of synth_docvqa batches asking 'Read the form.' (dense reading supervision)")
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
