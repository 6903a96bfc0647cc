"""The graph-safe per-token updates of the decode rules (`prepare_static` + `on_token_static`, decode_rules.py):
the same cache as the eager `on_token` after every step, no host sync, no re-allocation.

H2O (Zhang et al. 2023), Elastic Cache's fixed point (Liu et al. 2024) and StreamingLLM's rolling cache
(Xiao et al. 2024), on the tiny random LLaVA's compressed cache, driven by random decode entries and queries
(so evictions vary more than under a random model's greedy tokens).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import preset

from vlcache.cache import CompressedCache, CompressedLayer
from vlcache.engine.generate import prefill_and_compress
from vlcache.policies.decode_rules import FixedPoint
from vlcache.policies.policy import build_policy

RULES = {
    "h2o": ("h2o", {}),
    "fixed_point": ("elastic", {}),
    "rolling": ("streamingllm", {"decode": {"name": "rolling"}}),
}
EXTRA = 8  # reserved room: decode steps


@pytest.fixture(scope="module")
def inputs(tiny_adapter):
    from conftest import random_images

    questions = ["What is the total?", "Which colour is the largest shape in the picture, and where is it?", "Hi?"]
    return tiny_adapter.build_inputs(questions, [[im] for im in random_images(3, seed=3)])


def _prefilled(adapter, inputs, rule: str, budget: float, static: bool):
    """The rule and the compressed cache, reserved as the fast path does (and the rule prepared if `static`)."""
    name, over = RULES[rule]
    policy = build_policy(preset(name, **over), budget)
    pre = prefill_and_compress(adapter, policy, inputs)
    for layer in pre.cache.layers:
        layer.reserve(int(layer.length.max()) + EXTRA)
    if static:
        policy.decode_rule.prepare_static(pre.cache)
    return policy.decode_rule, pre.cache


def _step(adapter, cache: CompressedCache, gen: torch.Generator):
    """Appends one random entry to every layer; yields (layer index, random query) after each append."""
    b, h, _, d = cache.layers[0].keys.shape
    hq = adapter.text_config.num_attention_heads
    for layer_idx, layer in enumerate(cache.layers):
        k, v = torch.randn(2, b, h, 1, d, generator=gen)
        layer.update(k, v)
        yield layer_idx, torch.randn(b, hq, 1, d, generator=gen)


def _valid(layer: CompressedLayer, t: torch.Tensor, by_position: bool = False) -> list:
    """Each row's valid entries, in slot order, or in position order (`by_position`: H2O's Triton form moves the
    row's last entry into the victim's slot, so only the set of entries is its semantics)."""
    rows = []
    for i, row in enumerate(layer.length):
        for j, n in enumerate(row.tolist()):
            order = layer.positions[i, j, :n].argsort() if by_position else torch.arange(n)
            rows.append(t[i, j, :n][order].tolist())
    return rows


@pytest.mark.parametrize("budget", [0.1, 0.3])
@pytest.mark.parametrize("rule", list(RULES))
def test_static_update_equals_on_token(tiny_adapter, inputs, rule, budget):
    eager, eager_cache = _prefilled(tiny_adapter, inputs, rule, budget, static=False)
    static, static_cache = _prefilled(tiny_adapter, inputs, rule, budget, static=True)
    assert eager.active
    evicted = False
    for _ in range(EXTRA):
        before = eager_cache.kept_counts().sum()
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for (i, q), (_, q2) in zip(_step(tiny_adapter, eager_cache, g1), _step(tiny_adapter, static_cache, g2)):
            eager.on_token(i, q, eager_cache)
            static.on_token_static(i, q2, static_cache)
        evicted |= bool(eager_cache.kept_counts().sum() < before + eager_cache.kept_counts().numel())
        # the same entries in the same order (the rules' semantics depend on the order: windows, queue, RoPE), but
        # for H2O, whose entries are a set (the eager form keeps them in position order)
        unordered = rule == "h2o"
        for layer, other in zip(eager_cache.layers, static_cache.layers):
            assert torch.equal(layer.length, other.length)
            for t in ("positions", "keys", "values"):
                assert _valid(layer, getattr(layer, t), unordered) == _valid(other, getattr(other, t), unordered), t
            assert int(layer.seen_device) == int(other.seen_device)
        if rule == "h2o":
            for layer, other, theirs, mine in zip(eager_cache.layers, static_cache.layers, eager.scores, static.scores):
                for got, want in zip(_valid(other, mine, True), _valid(layer, theirs, True)):
                    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    assert evicted


def _to_meta(obj):
    """`obj` with every tensor (also in lists) and module moved to the meta device: any read of a value on the
    host (`.item()`, `.tolist()`, `bool`, `int`, a copy to the CPU) raises there."""
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, torch.nn.Module):
        return copy.deepcopy(obj).to("meta")
    if isinstance(obj, list):
        return [_to_meta(x) for x in obj]
    return obj


def _meta_state(adapter, inputs, rule: str, static: bool):
    rule_obj, cache = _prefilled(adapter, inputs, rule, 0.1, static)
    for name, value in vars(rule_obj).items():
        setattr(rule_obj, name, _to_meta(value))
    for layer in cache.layers:
        for name in ("keys", "values", "positions", "length", "seen_device"):
            setattr(layer, name, _to_meta(getattr(layer, name)))
        layer.device = torch.device("meta")
    return rule_obj, cache


@pytest.mark.parametrize("rule", list(RULES))
def test_static_update_has_no_host_sync_and_keeps_storage(tiny_adapter, inputs, rule):
    """On the meta device every host read raises: the graph-safe update runs there, in place."""
    rule_obj, cache = _meta_state(tiny_adapter, inputs, rule, static=True)
    b, h, _, d = cache.layers[0].keys.shape
    hq = tiny_adapter.text_config.num_attention_heads
    for _ in range(2):
        for layer_idx, layer in enumerate(cache.layers):
            k = torch.empty(b, h, 1, d, device="meta")
            layer.update(k, k)
            storage = [layer.keys, layer.values, layer.positions, layer.length]
            scores = list(getattr(rule_obj, "scores", []))
            rule_obj.on_token_static(layer_idx, torch.empty(b, hq, 1, d, device="meta"), cache)
            # the same tensor objects: a captured graph keeps pointing at them
            assert all(x is y for x, y in zip(storage, [layer.keys, layer.values, layer.positions, layer.length]))
            assert all(x is y for x, y in zip(scores, getattr(rule_obj, "scores", [])))


@pytest.mark.parametrize("rule", ["h2o", "fixed_point"])
def test_meta_check_catches_the_eager_update(tiny_adapter, inputs, rule):
    """The check above has teeth: the eager `on_token` (host-side `any()`) fails on the meta device."""
    rule_obj, cache = _meta_state(tiny_adapter, inputs, rule, static=False)
    b, h, _, d = cache.layers[0].keys.shape
    layer = cache.layers[0]
    k = torch.empty(b, h, 1, d, device="meta")
    layer.update(k, k)
    with pytest.raises((RuntimeError, NotImplementedError)):
        rule_obj.on_token(0, torch.empty(b, tiny_adapter.text_config.num_attention_heads, 1, d, device="meta"), cache)


def _random_layer(gen: torch.Generator, b=3, h=4, cap=12, d=2) -> CompressedLayer:
    layer = CompressedLayer()
    k = torch.randn(b, h, cap, d, generator=gen)
    layer.update(k, k + 1)
    layer.length = torch.randint(1, cap + 1, (b, h), generator=gen)
    layer.positions = torch.randperm(b * h * cap, generator=gen).view(b, h, cap)
    return layer


def test_drop_block_equals_successive_removes():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        layer = _random_layer(gen)
        ref = copy.deepcopy(layer)
        start = (torch.rand(layer.length.shape, generator=gen) * layer.length).long()
        count = torch.minimum(torch.randint(0, 4, layer.length.shape, generator=gen), layer.length - start)
        keys = layer.keys
        layer.drop_(start, count)
        assert layer.keys is keys
        for i in range(int(count.max())):
            ref.remove(start, count > i)
        assert torch.equal(layer.length, ref.length)
        for t, u in ((layer.keys, ref.keys), (layer.values, ref.values), (layer.positions, ref.positions)):
            assert _valid(layer, t) == _valid(ref, u)


def test_fixed_point_block_equals_the_eager_loop():
    """Several deletions in one step (the limit far below the length) and `N_tl` past the row's end: the one
    block deletion equals the eager while loop."""
    gen = torch.Generator().manual_seed(1)
    most = 0
    for budget in (0.05, 0.3, 0.6):
        for recent_distance in (0, 2, 9):
            layer = _random_layer(gen, cap=16)
            layer.length = torch.randint(4, 13, layer.length.shape, generator=gen)
            cache = CompressedCache(1)
            cache.layers[0] = layer
            info = SimpleNamespace(lengths=torch.randint(5, 30, (3,), generator=gen), m=layer.seen)
            eager, static = FixedPoint(recent_distance), FixedPoint(recent_distance)
            keep = torch.randint(2, 13, (1, 3, 4), generator=gen)
            eager.setup(cache, info, budget, keep)
            ref = copy.deepcopy(cache)
            layer.reserve(layer.capacity)
            static.setup(cache, info, budget, keep)
            static.prepare_static(cache)
            before = layer.length.clone()
            static.on_token_static(0, torch.empty(0), cache)
            eager.on_token(0, torch.empty(0), ref)
            other = ref.layers[0]
            most = max(most, int((before - layer.length).max()))
            assert torch.equal(layer.length, other.length)
            assert _valid(layer, layer.positions) == _valid(other, other.positions)
            assert _valid(layer, layer.keys) == _valid(other, other.keys)
    assert most >= 2  # the block form was exercised


def test_h2o_window_starts_at_the_recent_newest_position():
    """`rule_ops.h2o_window` (where H2O's unordered Triton form starts its recent window): the `recent`-th newest of
    each row's entries and the next token, the oldest where the row holds fewer, none (above every position) for
    `recent` 0; against a loop over rows of random lengths and sorted distinct positions."""
    from vlcache.kernels.rule_ops import h2o_window

    gen = torch.Generator().manual_seed(3)
    b, h, cap, nxt = 4, 3, 12, 500
    positions = torch.randperm(400, generator=gen)[: b * h * cap].view(b, h, cap).sort(-1).values
    length = torch.randint(0, cap + 1, (b, h), generator=gen)
    length[0, 0] = 0
    recent = torch.tensor([0, 1, 5, 30])
    got = h2o_window(positions, length, recent, nxt)
    for i in range(b):
        for j in range(h):
            row = positions[i, j, : int(length[i, j])].tolist() + [nxt]
            r = int(recent[i])
            want = 2**62 if r == 0 else sorted(row)[max(len(row) - r, 0)]
            assert int(got[i, j]) == want, (i, j, r, row)
