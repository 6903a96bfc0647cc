"""The engine: full ≡ transformers, budget 1.0 ≡ full, positions after eviction, padding, memory."""

import pytest
import torch
from conftest import preset, random_images
from reference import masked_reference_generate

from vlcache.engine.generate import generate
from vlcache.policies.policy import build_policy

STEPS = 8


def test_full_matches_transformers_generate(tiny_adapter, batch_inputs):
    out = generate(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, STEPS)
    model, cfg = tiny_adapter.model, tiny_adapter.text_config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "sdpa"
    try:
        with torch.inference_mode():
            ref = model.generate(**batch_inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=None)
    finally:
        cfg._attn_implementation = saved
    expected = ref[:, batch_inputs["input_ids"].shape[1]:].tolist()
    assert out.tokens == [t[: t.index(tiny_adapter.eos_token_id)] if tiny_adapter.eos_token_id in t else t
                          for t in expected]


@pytest.mark.parametrize("name", ["full", "streamingllm"])
def test_budget_one_is_full(tiny_adapter, batch_inputs, name):
    full = generate(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, STEPS)
    out = generate(tiny_adapter, build_policy(preset(name), 1.0), batch_inputs, STEPS)
    assert out.tokens == full.tokens
    assert out.report.realised_budget == 1.0


@pytest.mark.parametrize("budget", [0.5, 0.1])
def test_compressed_decoding_equals_masked_reference(tiny_adapter, batch_inputs, budget):
    """Gathering kept entries and decoding at the original positions = masking evicted keys in a full cache."""
    policy = build_policy(preset("streamingllm"), budget)
    out = generate(tiny_adapter, policy, batch_inputs, STEPS)
    assert out.report.realised_budget < budget + 0.02
    ref = masked_reference_generate(tiny_adapter, batch_inputs, out.kept_positions, STEPS)
    eos = tiny_adapter.eos_token_id
    assert out.tokens == [t[: t.index(eos)] if eos in t else t for t in ref]


def test_positions_continue_from_prompt_length(tiny_adapter, batch_inputs, monkeypatch):
    """Decoding at the cache's physical length instead of the prompt length changes the answer."""
    policy = build_policy(preset("streamingllm"), 0.1)
    seen = []
    original = tiny_adapter.decode

    def spy(tokens, positions, cache):
        seen.append(positions.clone())
        return original(tokens, positions, cache)

    monkeypatch.setattr(tiny_adapter, "decode", spy)
    generate(tiny_adapter, policy, batch_inputs, 4)
    lengths = batch_inputs["attention_mask"].sum(1)
    assert torch.equal(seen[0], lengths) and torch.equal(seen[2], lengths + 2)


def test_batch_with_padding_equals_one_by_one(tiny_adapter):
    questions = ["How many?", "What is written at the top of the form, in the left column?", "Describe it."]
    images = [[im] for im in random_images(3)]
    policy = build_policy(preset("streamingllm"), 0.3)
    batched = generate(tiny_adapter, policy, tiny_adapter.build_inputs(questions, images), STEPS)
    for i in range(3):
        single = generate(tiny_adapter, policy, tiny_adapter.build_inputs(questions[i : i + 1], images[i : i + 1]),
                          STEPS)
        assert single.tokens[0] == batched.tokens[i]
        assert single.report.keep_counts[:, 0].tolist() == batched.report.keep_counts[:, i].tolist()


def test_kept_memory_and_positions(tiny_adapter, batch_inputs):
    full = generate(tiny_adapter, build_policy(preset("full"), 1.0), batch_inputs, 2)
    out = generate(tiny_adapter, build_policy(preset("streamingllm"), 0.1), batch_inputs, 2)
    lengths = batch_inputs["attention_mask"].sum(1)
    k = torch.round(0.1 * lengths.double()).long()
    assert out.report.keep_counts[0, :, 0].tolist() == k.tolist()
    assert out.kv_bytes_full == full.kv_bytes_kept
    assert out.kv_bytes_kept / full.kv_bytes_kept == pytest.approx(int(k.sum()) / int(lengths.sum()))
    # storage is sized to the largest kept row (plus nothing): real memory, not a mask
    assert out.kv_bytes_allocated <= full.kv_bytes_allocated * float(k.max()) / float(lengths.max()) + 1
    for b in range(2):
        kept = out.kept_positions[0][b, 0, : int(k[b])]
        n = int(lengths[b])
        expected = list(range(4)) + list(range(n - int(k[b]) + 4, n))
        assert kept.tolist() == expected  # 4 sinks + the most recent, unpadded indices
    assert out.image_tokens == [576, 576]
