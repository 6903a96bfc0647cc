"""The presets end to end on the tiny random LLaVA (policies.md §5): budget 1 ≡ full, realised budgets within
what each policy promises, the decode rules (H2O, Elastic's fixed point, StreamingLLM's rolling cache),
combinations of parts across papers, and the clamp of budgets too small for the protected tokens.

The batch is two left-padded prompts of different lengths with one random image each (612 and 660 tokens).
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
from conftest import preset

from vlcache import kernels
from vlcache.engine.generate import generate
from vlcache.policies.allocators import Sparsity
from vlcache.policies.policy import build_policy
from vlcache.policies.rope import find_rotary, rotate_half, shift_rope

STEPS = 6
PRESETS = ["random", "streamingllm", "h2o", "snapkv", "pyramidkv", "elastic", "lookm", "vlcache"]


@pytest.fixture(autouse=True)
def torch_scoring_core(monkeypatch):
    """The PyTorch form of the scoring core (checked against the kernel in tests/test_scores.py): the Triton
    interpreter would take minutes over 600-token prompts."""
    torch_core = functools.partial(kernels.attention_scores, backend="torch")
    monkeypatch.setattr(kernels, "attention_scores", torch_core)


@pytest.fixture(scope="module")
def full_run(tiny_adapter, batch_inputs_module):
    return generate(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs_module, STEPS)


@pytest.fixture(scope="module")
def batch_inputs_module(tiny_adapter):
    from conftest import random_images

    questions = ["What is the total?", "Which colour is the largest shape in the picture, and where is it?"]
    return tiny_adapter.build_inputs(questions, [[im] for im in random_images(2)])


def trace_decode(policy, record):
    """Calls `record(layer_idx, query, cache, original_on_token)` in place of the decode rule's on_token."""
    rule = policy.decode_rule
    original = rule.on_token
    rule.on_token = lambda layer_idx, query, cache: record(layer_idx, query, cache, original)
    return rule


# -- budget 1 ≡ full -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,over", [(n, {}) for n in PRESETS] + [
    ("streamingllm", {"decode": {"name": "rolling"}}),
    ("lookm", {"reducer": {"name": "merge_similarity", "mode": "weighted"}}),
])
def test_budget_one_is_full(tiny_adapter, batch_inputs_module, full_run, name, over):
    out = generate(tiny_adapter, build_policy(preset(name, **over), 1.0), batch_inputs_module, STEPS)
    assert out.tokens == full_run.tokens
    assert out.report.realised_budget == 1.0


# -- realised budget -------------------------------------------------------------------------------
def test_realised_budget_within_promised_bounds(tiny_adapter, batch_inputs_module):
    budget = 0.1
    info = tiny_adapter.prompt_info(batch_inputs_module)
    lengths = info.lengths
    layers, n_min = tiny_adapter.num_layers, int(lengths.min())
    uniform = float(torch.round(budget * lengths.double()).sum() / lengths.sum())
    realised = {}
    for name in PRESETS:
        out = generate(tiny_adapter, build_policy(preset(name), budget), batch_inputs_module, 2)
        report = out.report
        realised[name] = r = report.realised_budget
        assert report.clamped == 0
        if name in ("random", "streamingllm", "h2o", "snapkv", "elastic"):
            assert r == pytest.approx(uniform, abs=1e-12)  # round(budget · m) in every layer and head
        elif name == "pyramidkv":  # floor divisions: at most (L - 1) / 2 extra per sequence and layer
            assert budget - 0.5 / n_min <= r <= budget + (layers - 1) / (2 * n_min) + 0.5 / n_min
        elif name == "vlcache":  # clipping at 1 only lowers it; no layer is near the 1% floor here
            assert r <= budget + 0.5 / n_min
            beta = Sparsity().fractions(budget, report.sparsity)  # Algorithm 1 on the measured sparsity
            want = torch.round(beta * lengths.double()).long()
            assert torch.equal(report.keep_counts, want[..., None].expand_as(report.keep_counts))
        elif name == "lookm":  # every text token on top of the budget
            text = (info.key_valid & ~info.image_mask).sum(1)
            assert budget - 0.5 / n_min <= r <= budget + float(text.sum() / lengths.sum()) + 0.5 / n_min
        assert out.kv_bytes_kept <= out.kv_bytes_full * (r + 1e-9)
    print("realised at 0.1:", {k: round(v, 4) for k, v in realised.items()})


def test_budget_too_small_for_protected_tokens_clamps_and_logs(tiny_adapter, batch_inputs_module, caplog):
    with caplog.at_level(logging.WARNING, logger="vlcache.policies.policy"):
        out = generate(tiny_adapter, build_policy(preset("snapkv"), 0.01), batch_inputs_module, 2)
    assert "raised to the protected count" in caplog.text
    assert out.report.clamped == tiny_adapter.num_layers * 2
    assert bool((out.report.keep_counts == 32).all())  # the observation window
    with caplog.at_level(logging.WARNING, logger="vlcache.policies.policy"):
        out = generate(tiny_adapter, build_policy(preset("streamingllm"), 0.001), batch_inputs_module, 2)
    assert bool((out.report.keep_counts == 4).all())  # the sinks


@pytest.mark.parametrize("name,over", [
    ("vlcache", {"reducer": {"name": "merge_position"}}),
    ("snapkv", {"allocator": {"name": "sparsity", "p": 0.01, "min_fraction": 0.01, "max_fraction": 1.0,
                              "fallback_window": 32}}),
    ("h2o", {"reducer": {"name": "merge_similarity", "mode": "averaged"}, "granularity": "layer"}),
])
def test_parts_combine_across_papers(tiny_adapter, batch_inputs_module, name, over):
    out = generate(tiny_adapter, build_policy(preset(name, **over), 0.2), batch_inputs_module, 3)
    assert len(out.tokens) == 2 and out.new_tokens == 3
    assert 0.05 < out.report.realised_budget < 0.35
    if over.get("allocator", {}).get("name") == "sparsity":
        assert out.report.sparsity is not None and out.report.sparsity.shape == (tiny_adapter.num_layers, 2)


# -- decode rules ----------------------------------------------------------------------------------
def test_h2o_decode_keeps_size_and_evicts_lowest_running_score(tiny_adapter, batch_inputs_module):
    policy = build_policy(preset("h2o"), 0.1)
    steps = []

    def record(layer_idx, query, cache, on_token):
        rule, layer = policy.decode_rule, cache.layers[layer_idx]
        b, h, cap, d = layer.keys.shape
        prev = rule.scores[layer_idx]
        prev = torch.cat([prev, prev.new_zeros(b, h, cap - prev.shape[-1])], -1)
        # float64 attention row of the new token over each head's valid entries
        q = query.double().reshape(b, h, -1, d)
        logits = torch.einsum("bhgd,bhkd->bhgk", q, layer.keys.double()) * d**-0.5
        row = torch.softmax(logits.masked_fill(~layer.valid_mask()[:, :, None], -torch.inf), -1).sum(2)
        expected = prev.double() + row
        before, n = layer.positions.clone(), layer.length.clone()
        on_token(layer_idx, query, cache)
        assert torch.equal(layer.length, rule.keep[layer_idx])  # size constant after each token
        for bi in range(b):
            recent = int(rule.recent[layer_idx][bi])
            for hi in range(h):
                nn = int(n[bi, hi])
                gone = set(before[bi, hi, :nn].tolist()) - set(layer.positions[bi, hi, : nn - 1].tolist())
                slot = before[bi, hi, :nn].tolist().index(gone.pop())
                assert slot < nn - recent  # never from the recent window
                assert expected[bi, hi, slot] <= expected[bi, hi, : nn - recent].min() + 1e-5
                keep = [j for j in range(nn) if j != slot]
                got = rule.scores[layer_idx][bi, hi, : nn - 1].double()
                torch.testing.assert_close(got, expected[bi, hi, keep], rtol=1e-4, atol=1e-5)
        steps.append(layer_idx)

    trace_decode(policy, record)
    out = generate(tiny_adapter, policy, batch_inputs_module, STEPS)
    assert len(steps) == (out.new_tokens - 1) * tiny_adapter.num_layers


def test_elastic_fixed_point_trajectory(tiny_adapter, batch_inputs_module):
    budget = 0.1
    policy = build_policy(preset("elastic"), budget)
    info = tiny_adapter.prompt_info(batch_inputs_module)
    trace = []

    def record(layer_idx, query, cache, on_token):
        on_token(layer_idx, query, cache)
        layer = cache.layers[layer_idx]
        trace.append((layer_idx, layer.seen - info.m, layer.length.clone(), layer.positions.clone()))

    trace_decode(policy, record)
    out = generate(tiny_adapter, policy, batch_inputs_module, 12)
    kept = out.report.keep_counts  # [L, B, H]
    n_tl = policy.decode_rule.n_tl
    assert torch.equal(n_tl, kept - 24)
    for layer_idx, t, length, positions in trace:
        seen = info.lengths + t
        limit = torch.tensor([math.ceil(round(budget * int(s), 9)) for s in seen])
        want = torch.minimum(kept[layer_idx] + t, limit[:, None])
        assert torch.equal(length, want)
        # the merged prefix before N_tl never changes; after it, a queue of the latest entries
        prompt = out.kept_positions[layer_idx] + info.pad[:, None, None]
        for b in range(2):
            for h in range(positions.shape[1]):
                cut, n = int(n_tl[layer_idx, b, h]), int(length[b, h])
                assert torch.equal(positions[b, h, :cut], prompt[b, h, :cut])
                generated = list(range(info.m, info.m + t))
                tail = prompt[b, h, cut: int(kept[layer_idx, b, h])].tolist() + generated
                assert positions[b, h, cut:n].tolist() == tail[len(tail) - (n - cut):]


def test_rope_shift_moves_keys_to_new_positions(tiny_adapter):
    rotary = find_rotary(tiny_adapter.model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, tiny_adapter.head_dim, generator=gen)
    pos = torch.randint(0, 500, (2, 3, 7), generator=gen)
    delta = torch.randint(-400, 400, (2, 3, 7), generator=gen)

    def rope(t, p):
        cos, sin = rotary(t, p)
        return t * cos + rotate_half(t) * sin

    moved = shift_rope(rope(x, pos), delta, rotary)
    torch.testing.assert_close(moved, rope(x, pos + delta), rtol=1e-4, atol=1e-4)


def test_rolling_cache_constant_and_keys_at_consecutive_positions(tiny_adapter, batch_inputs_module):
    # the prefill's keys, post-RoPE at their original (padded) positions, as compression finds them
    full_policy = build_policy(preset("full"), 1.0)
    compress = full_policy.compress
    captured = {}

    def keep_keys(cache):
        captured["prefill"] = [layer.keys.clone() for layer in cache.layers]
        return compress(cache)

    full_policy.compress = keep_keys
    generate(tiny_adapter, full_policy, batch_inputs_module, 1)
    full_keys = captured["prefill"]

    policy = build_policy(preset("streamingllm", decode={"name": "rolling"}), 0.1)
    info = tiny_adapter.prompt_info(batch_inputs_module)
    sizes = []

    def record(layer_idx, query, cache, on_token):
        on_token(layer_idx, query, cache)
        captured["rolling"] = cache
        sizes.append(torch.equal(cache.layers[layer_idx].length, policy.decode_rule.keep[layer_idx]))

    trace_decode(policy, record)
    generate(tiny_adapter, policy, batch_inputs_module, STEPS)
    assert all(sizes)
    rotary = find_rotary(tiny_adapter.model)
    for layer_idx, layer in enumerate(captured["rolling"].layers):
        steps = layer.seen - info.m
        for b in range(2):
            pad, n = int(info.pad[b]), int(info.lengths[b])
            for h in range(layer.keys.shape[1]):
                k = int(layer.length[b, h])
                pos = layer.positions[b, h, :k].tolist()
                # 4 sinks, then the latest k - 4 tokens seen
                assert pos == list(range(pad, pad + 4)) + list(range(layer.seen - (k - 4), layer.seen))
                target = torch.arange(k) + n - k + steps  # consecutive, ending at the last token's position
                rope_pos = torch.tensor(pos) - pad
                assert torch.equal(rope_pos[rope_pos >= n], target[rope_pos >= n])  # generated: never moved
                prompt = (rope_pos < n).nonzero().flatten()
                orig = full_keys[layer_idx][b, h, torch.tensor(pos)[prompt]]
                want = shift_rope(orig, (target - rope_pos)[prompt], rotary)
                torch.testing.assert_close(layer.keys[b, h, prompt], want, rtol=1e-4, atol=1e-4)
