"""The Triton forms of the decode rules' per-token updates (vlcache/kernels/rule_ops.py) against exact references:
the in-place shift against a plain Python loop per row; H2O (Zhang et al. 2023), Elastic Cache's fixed point (Liu et
al. 2024) and StreamingLLM's rolling cache (Xiao et al. 2024) through `on_token_static` against its PyTorch form,
step after step, on the same random caches. Interpreter on the CPU (`TRITON_INTERPRET=1`), native on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from vlcache.cache import CompressedCache, CompressedLayer
from vlcache.kernels import rule_ops
from vlcache.kernels.decode_attention import decode_attention
from vlcache.kernels.rule_ops import RuleConfig, RuleScratch, shift_rows_
from vlcache.policies import decode_rules
from vlcache.policies.decode_rules import H2O, FixedPoint, Rolling

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs CUDA or TRITON_INTERPRET=1")

# small tiles, so that rows of a few dozen entries span several, in one program per row or split over several
ONE = RuleConfig(block_n=16, block_s=4, min_per_split=1024, select_block_n=16)
SPLIT = RuleConfig(block_n=16, block_s=4, min_per_split=12, waves=64, select_block_n=16)


@pytest.fixture(autouse=True)
def programs_backwards(monkeypatch):
    """The interpreter runs a grid's programs in order, in which a chunk always reads the next one before that is
    shifted: run them backwards instead, so that a chunk boundary read without the side buffer shows (a GPU runs
    them in any order)."""
    if INTERPRET:
        from triton.runtime import interpreter

        builder = type(interpreter.interpreter_builder)
        forwards = builder.set_grid_idx

        def backwards(self, x, y, z):
            nx, ny, nz = self.grid_dim
            forwards(self, nx - 1 - x, ny - 1 - y, nz - 1 - z)

        monkeypatch.setattr(builder, "set_grid_idx", backwards)


# the layers' launch reaches other layers' buffers through offsets from layer 0's: the interpreter maps only the
# arguments' own memory for bfloat16 (it converts them), so there it runs on float32 caches
DTYPES_BATCHED = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@contextlib.contextmanager
def torch_path():
    """The rules' (and `drop_`'s) PyTorch form: the kernels reported unsupported."""
    saved = rule_ops.supported
    rule_ops.supported = lambda t: False
    try:
        yield
    finally:
        rule_ops.supported = saved


def _rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


# -- the shift -------------------------------------------------------------------------------------------------
# (length, start, count) per row: empty and full rows, start at 0 / middle / end, count 0, 1, several, and more
# than the side buffer holds (4: that row is shifted serially)
CASES = [(0, 0, 0), (37, 0, 1), (37, 0, 5), (37, 36, 1), (37, 18, 3), (1, 0, 1), (20, 0, 0), (36, 35, 1),
         (33, 0, 4), (29, 7, 6), (16, 15, 1), (37, 11, 2)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 4])
def test_shift_rows_equals_a_loop(dtype, chunks):
    b, h, cap, d = 3, 4, 37, 24  # odd capacity, head dim not a power of two
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    config = RuleConfig(block_n=4, block_s=4)  # chunks of 12 entries: entries cross chunk boundaries
    for round_ in range(3):
        if round_ == 0:
            length, start, count = torch.tensor(CASES).T.reshape(3, b, h)
        else:
            length = torch.randint(0, cap + 1, (b, h), generator=gen)
            count = torch.minimum(torch.randint(0, 7, (b, h), generator=gen), length)
            start = (torch.rand(b, h, generator=gen) * (length - count + 1)).long()
        keys, values = _rand(gen, b, h, cap, d, dtype=dtype), _rand(gen, b, h, cap, d, dtype=dtype)
        positions = torch.randperm(b * h * cap, generator=gen).view(b, h, cap).to(DEVICE)
        extra = _rand(gen, b, h, cap)
        before = [t.clone().cpu() for t in (keys, values, positions, extra)]
        new = length.to(DEVICE).clone()
        # round 2 with a preallocated scratch (what the rules pass), the others allocate per call
        scratch = RuleScratch(keys, cap, chunks, side=4) if round_ == 2 and chunks > 1 else None
        shift_rows_(keys, values, positions, new, start.to(DEVICE), count.to(DEVICE), extra,
                    zero_extra=chunks > 1, chunks=chunks, scratch=scratch, config=config)  # fmt: skip
        assert torch.equal(new.cpu(), length - count)
        after = [t.cpu() for t in (keys, values, positions, extra)]
        for i in range(b):
            for j in range(h):
                n, s, c = int(length[i, j]), int(start[i, j]), int(count[i, j])
                for t, old in zip(after, before):
                    ref = [old[i, j, k] for k in range(n) if not s <= k < s + c]  # the loop
                    assert torch.equal(t[i, j, : n - c], torch.stack(ref) if ref else old[i, j, :0]), (i, j, n, s, c)
                    if t is not after[3] or chunks == 1:  # past the new length: the old tail, then spare room
                        assert torch.equal(t[i, j, n - c :], old[i, j, n - c :])
                    else:  # zero_extra: H2O's freed slots restart at 0
                        assert not t[i, j, n - c :].any()


def test_drop_dispatches_to_the_kernel():
    """`CompressedLayer.drop_` runs the kernel and keeps its storage; the valid entries equal its PyTorch form."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    layers = []
    for _ in range(2):
        layer = CompressedLayer()
        g = torch.Generator().manual_seed(7)
        k = torch.randn(2, 3, 19, 8, generator=g).to(DEVICE)
        layer.update(k, k + 1)
        layer.length = torch.tensor([[19, 0, 5], [12, 18, 1]], device=DEVICE)
        layers.append(layer)
    start = (torch.rand(2, 3, generator=gen) * layers[0].length.cpu()).long().to(DEVICE)
    count = torch.minimum(torch.randint(0, 3, (2, 3), generator=gen).to(DEVICE), layers[0].length - start)
    storage = layers[0].keys.data_ptr()
    layers[0].drop_(start, count, chunks=3)
    with torch_path():
        layers[1].drop_(start, count)
    assert layers[0].keys.data_ptr() == storage
    assert torch.equal(layers[0].length, layers[1].length)
    for t in ("keys", "values", "positions"):
        a, b = getattr(layers[0], t), getattr(layers[1], t)
        for (i, j), n in zip(
            torch.cartesian_prod(torch.arange(2), torch.arange(3)).tolist(), layers[0].length.flatten()
        ):
            assert torch.equal(a[i, j, :n], b[i, j, :n])


# -- the rules, through on_token_static ------------------------------------------------------------------------
def _cache(seed, lengths, caps, d, dtype, key_scale=1.0):
    """Layers of random entries (keys times `key_scale`), `lengths` valid per row (`[L, B, H]`), as many slots as
    the longest row."""
    gen = torch.Generator().manual_seed(seed)
    cache = CompressedCache(len(caps))
    b, h = lengths.shape[1:]
    for layer, n in zip(cache.layers, lengths):
        width = max(int(n.max()), 1)
        layer.update(_rand(gen, b, h, width, d, dtype=dtype) * key_scale, _rand(gen, b, h, width, d, dtype=dtype))
        layer.length = n.clone().to(DEVICE)
        # distinct positions in each row's order (a compressed cache's), below the appended tokens'
        layer.positions = torch.randperm(b * h * width, generator=gen).view(b, h, width).sort(-1).values.to(DEVICE)
        layer.seen = b * h * width
    return cache


def _reserve(cache, caps, rule):
    for layer, cap in zip(cache.layers, caps):
        layer.reserve(cap)
    rule.prepare_static(cache)


def _row(layer, t, x, y, ordered=True):
    """Row `(x, y)`'s valid entries of `t` (a tensor of `layer`'s shape), in slot order or in position order."""
    n = int(layer.length[x, y])
    row = t[x, y, :n]
    return row if ordered else row[layer.positions[x, y, :n].argsort()]


def _run(rules, caches, steps, hq, seed, after=None, key_scale=1.0, ordered=True, attend=False):
    """Appends one random entry per row to every layer and runs `on_token_static` (rules[0]: Triton, rules[1]:
    PyTorch), checking after each layer that both caches hold the same entries, in the same order (`ordered`) or
    in any (H2O's Triton form: compared in position order). `attend`: the Triton rule's logits come from the
    decode attention kernel (`attention_logits`), as in the fused step."""
    gen = torch.Generator().manual_seed(seed)
    layers = len(caches[0].layers)
    b, h, _, d = caches[0].layers[0].keys.shape
    dtype = caches[0].layers[0].keys.dtype
    for _ in range(steps):
        for i in range(layers):
            k, v, q = _rand(gen, b, h, 1, d, dtype=dtype), _rand(gen, b, h, 1, d, dtype=dtype), _rand(gen, b, hq, 1, d)
            k = k * key_scale
            storage = []
            for which, (rule, cache) in enumerate(zip(rules, caches)):
                layer = cache.layers[i]
                layer.update(k, v)
                storage.append([layer.keys.data_ptr(), layer.values.data_ptr(), layer.length.data_ptr()])
                if attend and not which:
                    decode_attention(q.to(dtype), layer.keys, layer.values, layer.length,
                                     logits=rule.attention_logits(i, hq))  # fmt: skip
                with torch_path() if which else contextlib.nullcontext():
                    rule.on_token_static(i, q.to(dtype), cache)
                assert storage[-1] == [layer.keys.data_ptr(), layer.values.data_ptr(), layer.length.data_ptr()]
            mine, ref = caches[0].layers[i], caches[1].layers[i]
            assert torch.equal(mine.length, ref.length)
            for x, y in torch.cartesian_prod(torch.arange(b), torch.arange(h)).tolist():
                for t in ("keys", "values", "positions"):
                    got, want = _row(mine, getattr(mine, t), x, y, ordered), _row(ref, getattr(ref, t), x, y)
                    assert torch.equal(got, want), (t, x, y)
            if after is not None:
                after(i)


def _h2o(group, dtype, split, steps, key_scale=1.0, attend=False):
    """Runs H2O on both paths and checks after every layer: scores allclose (0 past the length), the same victims
    and kept entries."""
    seed = int(torch.randint(0, 2**31, ()))
    h, d = 2, 32
    # per layer and row: empty, full after each append, no candidate (3 entries, sinks 2, recent 3), long rows
    lengths = torch.tensor([[[0, 44], [3, 40]], [[36, 1], [29, 33]]])
    caps = [45, 39]  # odd, different per layer
    keep = lengths.clone()
    keep[0, 1, 1] += 2  # grows for two steps before evicting
    recent = torch.tensor([[0, 3], [1, 3]])
    rules, caches, victims, moved = [], [], [], []
    for _ in range(2):
        gen = torch.Generator().manual_seed(seed)
        cache = _cache(seed, lengths, caps, d, dtype, key_scale)
        # noise past the length too (the first update clears it); equal scores where the keys are 0 (ties)
        scores = [torch.rand(la.keys.shape[:3], generator=gen).to(DEVICE) * key_scale + 0.5 for la in cache.layers]
        rule = H2O()
        rule.setup(cache, None, 0.5, keep, scores=scores, sinks=2, recent=recent)
        _reserve(cache, caps, rule)
        rules.append(rule)
        caches.append(cache)

    def check(i):
        mine, ref = rules[0].scores[i], rules[1].scores[i]
        layer, ref_layer = caches[0].layers[i], caches[1].layers[i]
        for x, y in torch.cartesian_prod(torch.arange(2), torch.arange(h)).tolist():
            got, want = _row(layer, mine, x, y, ordered=False), _row(ref_layer, ref, x, y)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        live = torch.arange(mine.shape[-1], device=DEVICE) < layer.length[..., None]
        assert not mine[~live].any()
        victims.append(ref_layer.positions.clone())
        moved.append(not torch.equal(layer.positions[live], ref_layer.positions[live]))

    _run(rules, caches, steps, h * group, seed, check, key_scale, ordered=False, attend=attend)
    assert any(moved)  # the Triton form filled a victim's slot (not a shift)
    assert all((s.splits > 1) == split for s in rules[0].static_scratch)  # split: the three-launch path ran
    assert len({tuple(v.flatten().tolist()) for v in victims}) > 2  # the cache changed from step to step


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_h2o_equals_the_pytorch_form(group, dtype, split, monkeypatch):
    monkeypatch.setattr(rule_ops, "DEFAULT_CONFIG", SPLIT if split else ONE)
    _h2o(group, dtype, split, steps=4)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
def test_h2o_with_the_attentions_logits_equals_the_pytorch_form(group, dtype, split, monkeypatch):
    """The fused step's form: the decode attention kernel writes the logits and its log2-sum-exp2s (split over
    the key axis or not), and the rule reads them instead of the keys."""
    monkeypatch.setattr(rule_ops, "DEFAULT_CONFIG", SPLIT if split else ONE)
    calls = []
    real = rule_ops.h2o_step_
    monkeypatch.setattr(rule_ops, "h2o_step_", lambda *a, **kw: calls.append(kw["from_attention"]) or real(*a, **kw))
    _h2o(group, dtype, split, steps=3, attend=True)
    assert calls and all(calls)


@pytest.mark.parametrize("finish", ["fused", "launch"])
def test_h2o_victim_pick_in_the_last_split_or_a_launch(finish, monkeypatch):
    """Split rows pick their victim in the row's last split program (a per-row counter, back at 0 after each
    update) or in a launch of their own: the same result."""
    monkeypatch.setattr(rule_ops, "DEFAULT_CONFIG", dataclasses.replace(SPLIT, h2o_finish=finish))
    counts = []
    real = rule_ops.h2o_step_
    monkeypatch.setattr(rule_ops, "h2o_step_", lambda *a, **kw: real(*a, **kw) or counts.append(a[10].count.clone()))
    _h2o(4, torch.bfloat16, True, steps=3)
    assert counts and not torch.stack(counts).any()


@pytest.mark.parametrize("split", [False, True])
def test_h2o_ties_go_to_the_lowest_slot(split, monkeypatch):
    """Zero keys and equal prefill scores: every candidate has the same score, within a tile, across tiles and
    across splits; torch.argmin's rule (the lowest slot) must pick the victim, so the first candidate goes."""
    monkeypatch.setattr(rule_ops, "DEFAULT_CONFIG", SPLIT if split else ONE)
    _h2o(4, torch.float32, split, steps=3, key_scale=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fixed_point_equals_the_pytorch_form(dtype):
    """Elastic Cache's fixed point: several deletions in one step (a budget far below the kept count), `N_tl`
    past a row's end, and budgets whose limit lands on integers (the float64 ceil)."""
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    most = 0
    for budget in (0.05, 0.25, 0.6):
        for recent_distance in (0, 2, 9):
            b, h, caps = 3, 4, [23, 21]
            lengths = torch.randint(0, 16, (2, b, h), generator=gen)
            keep = torch.randint(0, 16, (2, b, h), generator=gen)
            info = SimpleNamespace(lengths=torch.randint(4, 40, (b,), generator=gen).to(DEVICE), m=16)
            rules, caches = [], []
            for _ in range(2):
                cache = _cache(seed, lengths, caps, 8, dtype)
                rule = FixedPoint(recent_distance)
                rule.setup(cache, info, budget, keep)
                _reserve(cache, caps, rule)
                rules.append(rule)
                caches.append(cache)
            before = torch.stack([layer.length for layer in caches[0].layers]) + 1
            _run(rules, caches, 1, h, seed)
            most = max(most, int((before.cpu() - torch.stack([la.length for la in caches[0].layers]).cpu()).max()))
            _run(rules, caches, 2, h, seed + 1)
    assert most >= 2  # the block form was exercised


@pytest.mark.parametrize("dtype", DTYPES_BATCHED)
def test_fixed_point_for_every_layer_in_one_launch(dtype, monkeypatch):
    """Layers of one capacity: `prepare_static` finds one set of strides, `on_token_static` leaves the rows alone and
    `on_step_static` deletes every layer's block in one launch, equal to the per-layer PyTorch form after each step
    (deletions of several entries included); layers of different capacities, or with as many rows as the GPU has
    multiprocessors, keep the per-layer launches."""
    monkeypatch.setattr(decode_rules, "sm_count", lambda device: 7)  # 6 rows a layer below: batched
    seed = int(torch.randint(0, 2**31, ()))
    gen = torch.Generator().manual_seed(seed)
    b, h, d, cap = 2, 3, 8, 40
    lengths = torch.randint(0, 30, (3, b, h), generator=gen)
    keep = torch.randint(0, 30, (3, b, h), generator=gen)
    # tokens seen b·h·(a layer's longest row) - m + a prompt length of 4-40: limits of 1-10, so some rows lose
    # several entries in the first step
    info = SimpleNamespace(lengths=torch.randint(4, 40, (b,), generator=gen).to(DEVICE), m=150)
    lengths[:, 0, 0] = 29
    rules, caches = [], []
    for _ in range(2):
        cache = _cache(seed, lengths, [cap] * 3, d, dtype)
        rule = FixedPoint(5)
        rule.setup(cache, info, 0.15, keep)
        _reserve(cache, [cap] * 3, rule)
        rules.append(rule)
        caches.append(cache)
    assert rules[0].layer_offsets is not None
    moved = 0
    for _ in range(3):
        k, v = _rand(gen, 3, b, h, 1, d, dtype=dtype), _rand(gen, 3, b, h, 1, d, dtype=dtype)
        before = [layer.length.clone() for layer in caches[0].layers]
        for i in range(3):
            for which, (rule, cache) in enumerate(zip(rules, caches)):
                cache.layers[i].update(k[i], v[i])
                with torch_path() if which else contextlib.nullcontext():
                    rule.on_token_static(i, None, cache)
            assert torch.equal(caches[0].layers[i].length, before[i] + 1)  # left for the step's end
        rules[0].on_step_static(caches[0])
        with torch_path():
            rules[1].on_step_static(caches[1])  # the PyTorch form has no batched update: nothing happens
        for mine, ref, was in zip(caches[0].layers, caches[1].layers, before):
            assert torch.equal(mine.length, ref.length)
            moved = max(moved, int((was + 1 - mine.length).max()))
            for x, y in torch.cartesian_prod(torch.arange(b), torch.arange(h)).tolist():
                for t in ("keys", "values", "positions"):
                    assert torch.equal(_row(mine, getattr(mine, t), x, y), _row(ref, getattr(ref, t), x, y))
    assert moved >= 2  # a block of several deletions, not only one
    other = _cache(seed, lengths, [cap, cap - 1, cap], d, dtype)
    rule = FixedPoint(5)
    rule.setup(other, info, 0.15, keep)
    _reserve(other, [cap, cap - 1, cap], rule)
    assert rule.layer_offsets is None
    monkeypatch.setattr(decode_rules, "sm_count", lambda device: 6)
    rule.setup(caches[0], info, 0.15, keep)
    rule.prepare_static(caches[0])
    assert rule.layer_offsets is None


def test_layer_offsets_are_element_offsets():
    base = torch.zeros(4, 3, 5, dtype=torch.float32, device=DEVICE)
    parts = list(base.unbind(0))
    off = rule_ops.layer_offsets(parts, [t.clone() for t in parts])
    assert off.shape == (2, 4) and off[0].tolist() == [0, 15, 30, 45] and off[1, 0] == 0
    assert rule_ops.layer_offsets([parts[0], parts[1][:, :4]]) is None  # shapes differ
    assert rule_ops.layer_offsets([parts[0], parts[1].double()]) is None  # dtypes differ


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolling_equals_the_pytorch_form(dtype, split, monkeypatch):
    """StreamingLLM's rolling cache: the oldest non-sink entry deleted, rows under their keep count left alone."""
    monkeypatch.setattr(rule_ops, "DEFAULT_CONFIG", SPLIT if split else ONE)
    seed = int(torch.randint(0, 2**31, ()))
    h, d, caps = 3, 16, [41, 35]
    lengths = torch.tensor([[[0, 40, 3], [17, 1, 33]], [[30, 2, 25], [34, 9, 12]]])
    keep = lengths.clone()
    keep[:, 0, 0] += 2
    info = SimpleNamespace(lengths=torch.tensor([60, 50], device=DEVICE), pad=torch.tensor([0, 3], device=DEVICE), m=64)
    rules, caches = [], []
    for _ in range(2):
        cache = _cache(seed, lengths, caps, d, dtype)
        rule = Rolling()
        rule.rotary = LlamaRotaryEmbedding(LlamaConfig(head_dim=d)).to(DEVICE)  # plain RoPE
        rule.setup(cache, info, 0.5, keep, sinks=2)
        _reserve(cache, caps, rule)
        rules.append(rule)
        caches.append(cache)
    if split:
        assert all(s.splits > 1 for s in rules[0].static_scratch)  # the save launch ran
    _run(rules, caches, 4, h, seed)
