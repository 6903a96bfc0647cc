"""The training-only curriculum of vlcache/zoo/train.py: forms given as text (--text-grid), the projector pulled to
the language model's character embeddings (--align), and text-only induction batches (--copy)."""

from __future__ import annotations

import json
import string

import pytest
import torch

from vlcache.data import generators
from vlcache.data.render import GRID, char_class

TINY_SPEC = {"hidden": 64, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 128, "vision_hidden": 32,
             "vision_layers": 1, "vision_heads": 2}  # fmt: skip


def test_grid_table_maps_each_cell_class_to_its_character():
    from vlcache.zoo.train import Encoder

    enc = Encoder()
    table = enc.grid_table()
    for ch in string.printable[:95]:  # the printable characters and the space
        assert enc.tok.convert_ids_to_tokens(int(table[char_class(ch)])) == ch


@pytest.mark.parametrize("index", [0, 7, 123])
def test_text_grid_lays_the_form_out_as_its_characters(index):
    from vlcache.zoo.train import Encoder, text_grid_ids, training_batch

    enc = Encoder()
    samples = [generators()["synth_docvqa"]("train", index + k, labels=True) for k in range(2)]
    batch = training_batch(enc, samples)
    ids = text_grid_ids(batch["input_ids"], batch["cells"], enc)
    image = batch["input_ids"] == enc.image_id
    assert torch.equal(ids[~image], batch["input_ids"][~image])  # the question and the answer are untouched
    for row, sample in zip(ids, samples):
        start = int((batch["input_ids"][0] == enc.image_id).nonzero()[0])
        chars = "".join(enc.tok.convert_ids_to_tokens(row[start : start + GRID * GRID].tolist()))
        lines = [chars[r * GRID : (r + 1) * GRID].strip() for r in range(GRID)]
        for line in sample["transcript"].split("\n"):  # "field: value" keeps its label column in the grid
            field, _, value = line.partition(": ")
            assert any(g.startswith(field + (":" if value else "")) and g.endswith(value) for g in lines), line
    with pytest.raises(ValueError, match="image tokens for"):
        text_grid_ids(batch["input_ids"], batch["cells"][:1], enc)


def test_copy_batch_supervises_the_repeat_only():
    from vlcache.zoo.train import Encoder, copy_batch

    enc = Encoder()
    batch = copy_batch(enc, 3, 17, torch.Generator().manual_seed(0))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (3, 2 * 17 + 3) and batch["pixels"] is None
    assert torch.equal(ids[:, 1:18], ids[:, 19:36])
    assert (ids[:, 0] == enc.tok.bos_token_id).all() and (ids[:, -1] == enc.eos_id).all()
    assert (labels[:, :19] == -100).all() and torch.equal(labels[:, 19:], ids[:, 19:])
    text = "".join(enc.tok.convert_ids_to_tokens(ids[:, 1:18].reshape(-1).tolist()))
    assert not set(text) & set(string.whitespace) and len(set(text)) > 10


def test_align_loss_against_a_float64_reference():
    from vlcache.zoo.train import align_loss

    embed = torch.nn.Embedding(50, 6)
    table = torch.randint(50, (95,))
    cells = torch.randint(95, (3, 13), dtype=torch.uint8)
    target = embed.weight.detach().double()[table[cells.long()]]
    assert align_loss(target.float(), cells, embed, table).item() == pytest.approx(0.0, abs=1e-6)
    assert align_loss(torch.zeros(3, 13, 6), cells, embed, table).item() == pytest.approx(1.0, rel=1e-5)
    feats = torch.randn(3, 13, 6, requires_grad=True)
    ref = ((feats.detach().double() - target) ** 2).mean() / (target**2).mean()
    loss = align_loss(feats, cells, embed, table)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert feats.grad.abs().sum() > 0 and embed.weight.grad is None  # the embeddings are the target, not pulled


@pytest.mark.parametrize(
    "tasks, options, logged",
    [
        ("synth_docvqa", ["--text-grid", "0.5", "--align", "1", "--copy", "0.3"], [" grid ", " copy ", " align "]),
        ("synth_docvqa", ["--align-ce", "1", "--grid-mix", "1", "--mix-frac", "0.5"], [" ce ", " mix "]),
        ("synth_multi", ["--aux-index", "1"], ["(index "]),
    ],
)
def test_training_with_each_option_logs_it(tmp_path, tasks, options, logged):
    from vlcache.zoo.train import main

    out = tmp_path / "run"
    main(["--device", "cpu", "--steps", "24", "--batch", "4", "--workers", "0", "--eval-n", "1", "--warmup", "2",
          "--spec", json.dumps(TINY_SPEC), "--out", str(out), "--tasks", tasks, "--log-every", "1",
          *options])  # fmt: skip
    log = (out / "log.txt").read_text()
    assert all(part in log for part in logged) and "0 skipped" in log
    assert (out / "eval.json").exists()


def test_freeze_lm_trains_the_image_path_only(tmp_path):
    from safetensors.torch import load_file

    from vlcache.zoo.train import main

    common = ["--device", "cpu", "--batch", "2", "--workers", "0", "--eval-n", "1", "--warmup", "1",
              "--spec", json.dumps(TINY_SPEC), "--tasks", "synth_docvqa,synth_count"]  # fmt: skip
    main([*common, "--steps", "1", "--out", str(tmp_path / "a")])
    main([*common, "--steps", "4", "--resume", str(tmp_path / "a" / "model_fp32.safetensors"), "--freeze-lm",
          "--align", "1", "--out", str(tmp_path / "b")])  # fmt: skip
    assert "language model frozen" in (tmp_path / "b" / "log.txt").read_text()
    before, after = (load_file(str(tmp_path / r / "model_fp32.safetensors")) for r in ("a", "b"))
    lm = [k for k in before if "language_model" in k or k.startswith("lm_head")]
    image = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k]
    assert lm and image and len(lm) + len(image) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in lm)
    assert any(not torch.equal(before[k], after[k]) for k in image)
    with pytest.raises(ValueError, match="--freeze-lm trains the image path"):
        main([*common, "--steps", "1", "--freeze-lm", "--copy", "0.2", "--out", str(tmp_path / "c")])


def test_align_ce_loss_against_a_float64_reference():
    from vlcache.data.render import CELL_BLANK
    from vlcache.zoo.train import align_ce_loss

    embed = torch.nn.Embedding(40, 8)
    table = torch.randperm(40)[:30]  # 30 classes onto distinct tokens, unsorted
    cells = torch.randint(30, (2, 17), dtype=torch.uint8)
    cells[0, :5] = CELL_BLANK
    feats = torch.randn(2, 17, 8, requires_grad=True)
    loss, acc = align_ce_loss(feats, cells, embed, table, tau=0.2)
    tokens = table.unique()
    w = torch.nn.functional.normalize(embed.weight.detach().double()[tokens], dim=-1)
    x = torch.nn.functional.normalize(feats.detach().double().reshape(-1, 8), dim=-1)
    target = torch.tensor([int((tokens == table[c]).nonzero()) for c in cells.reshape(-1).long()])
    ce = torch.nn.functional.cross_entropy(x @ w.T / 0.2, target, reduction="none")
    drawn = cells.reshape(-1) != CELL_BLANK
    ref = 0.5 * (ce[drawn].mean() + ce[~drawn].mean())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert acc.item() == pytest.approx(((x @ w.T).argmax(-1) == target)[drawn].double().mean().item())
    loss.backward()
    assert feats.grad.abs().sum() > 0 and embed.weight.grad is None
    # features pointing at their characters' embeddings (at any scale) are read perfectly
    exact = 5 * embed.weight.detach()[table[cells.long()]]
    loss_exact, acc_exact = align_ce_loss(exact, cells, embed, table, tau=0.2)
    assert acc_exact.item() == 1.0 and loss_exact.item() < loss.item()


def test_grid_mix_hands_the_language_model_a_mixture_and_falls_to_zero():
    from vlcache.zoo.model import TinyLlavaSpec
    from vlcache.zoo.train import Encoder, FeatureTap, GridMix, build_model, mix_alpha

    enc = Encoder()
    model = build_model(TinyLlavaSpec(**TINY_SPEC), enc).eval()
    tap, mixer = FeatureTap(model), GridMix(model)
    seen = []
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.append(o))
    pixels = torch.rand(1, 3, 336, 336)
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        raw = proj(model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        target = torch.randn_like(raw)
        for alpha in (0.0, 0.3, 1.0):
            mixer.set(alpha, target)
            seen.clear()
            out = proj(model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
            assert torch.allclose(tap.pop(), raw)  # the tap keeps the unmixed features
            assert torch.allclose(out, alpha * target + (1 - alpha) * raw, atol=1e-6)
            assert torch.allclose(seen[-1], out)
    assert mix_alpha(0.8, 0.0, 0.5) == 0.8 and mix_alpha(0.8, 0.25, 0.5) == pytest.approx(0.4)
    assert mix_alpha(0.8, 0.5, 0.5) == 0.0 and mix_alpha(0.8, 0.9, 0.5) == 0.0 and mix_alpha(1.0, 0.1, 0) == 0.0



def test_image_index_head_names_each_image_tokens_image():
    from vlcache.zoo.model import TinyLlavaSpec
    from vlcache.zoo.train import IMAGE_TOKENS, Encoder, ImageIndexHead, build_model, normalise, training_batch

    enc = Encoder()
    model = build_model(TinyLlavaSpec(**TINY_SPEC), enc).eval()
    with pytest.raises(ValueError, match="--index-layer 3"):
        ImageIndexHead(model, 3)
    head = ImageIndexHead(model, 1)
    samples = [generators()["synth_multi"]("train", i) for i in (3, 4)]
    batch = training_batch(enc, samples)
    ids = batch["input_ids"]
    with torch.no_grad():
        head.proj.weight.normal_()
        out = model(input_ids=ids, pixel_values=normalise(batch["pixels"]), output_hidden_states=True)
    image = ids == enc.image_id
    assert int(image.sum()) == 2 * 4 * IMAGE_TOKENS
    loss, acc = head.loss(ids, enc.image_id)
    hidden = out.hidden_states[1][image].double()  # after layer 1 (the last entry has the final norm applied)
    targets = torch.arange(4).repeat_interleave(IMAGE_TOKENS).repeat(2)
    logits = hidden @ head.proj.weight.double().T + head.proj.bias.double()
    ref = torch.nn.functional.cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    assert acc.item() == pytest.approx((logits.argmax(-1) == targets).double().mean().item())
    head.remove()
