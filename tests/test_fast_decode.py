"""The fast decode path (`generate_fast`) produces the simple loop's greedy tokens.

On CUDA: the tiny random LLaVA, a left-padded batch of 2, CUDA-graph replay with the Triton decode kernel.
On the CPU: the same path runs eagerly (reserved buffers, the kernel's PyTorch fallback). Policies are built
from conf/policy/*.yaml with PyYAML (no Hydra: the GPU machines do not have it).
"""

import copy
import os

import pytest
import torch
import yaml
from conftest import random_images

from vlcache.engine.fast_decode import generate_fast
from vlcache.engine.generate import generate
from vlcache.policies.policy import build_policy

STEPS = 10
CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "policy")
QUESTIONS = ["What is the total?", "Which colour is the largest shape in the picture, and where is it?"]


def policy(name: str, budget: float, **groups: str):
    """conf/policy/<name>.yaml with its defaults list resolved (`groups` override options), as Hydra
    composes it (presets without interpolations only)."""
    with open(os.path.join(CONF, f"{name}.yaml")) as f:
        cfg = yaml.safe_load(f)
    for entry in cfg.pop("defaults", []):
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            with open(os.path.join(CONF, group, f"{groups.get(group, option)}.yaml")) as f:
                cfg[group] = yaml.safe_load(f)
    return build_policy(cfg, budget)


def _adapter(device: str):
    import transformers

    if not hasattr(transformers, "CLIPImageProcessorPil"):  # older transformers (the GPU machines' 5.17)
        transformers.CLIPImageProcessorPil = transformers.CLIPImageProcessor
    from vlcache.models.adapter import LlavaAdapter
    from vlcache.zoo.model import build_random_llava

    model, processor = build_random_llava(seed=0)
    return LlavaAdapter(model.to(device), processor, device)


@pytest.fixture(scope="module")
def cuda_adapter():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return _adapter("cuda")


def _inputs(adapter):
    return adapter.build_inputs(QUESTIONS, [[im] for im in random_images(2, seed=7)])


def _early_eos(adapter, name="full", budget=1.0):
    """Inputs and a copy of the adapter whose EOS is a token both sequences generate, at different steps (so
    they stop at different times and the batch stops before `STEPS`), found from runs of the simple loop under
    the policy the test compares with."""
    fake = copy.copy(adapter)
    for seed in (1, 2, 3, 7):
        inputs = adapter.build_inputs(QUESTIONS, [[im] for im in random_images(2, seed=seed)])
        seqs = generate(adapter, policy(name, budget), inputs, STEPS).tokens
        first = [{t: seq.index(t) for t in reversed(seq)} for seq in seqs]
        common = [t for t in first[0] if t in first[1] and first[0][t] != first[1][t]]
        if common:
            fake.eos_token_id = common[0]
            return fake, inputs, True
    fake.eos_token_id = seqs[0][min(3, len(seqs[0]) - 1)]  # at least one sequence stops early
    return fake, inputs, False


# -- CUDA: graph replay --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(("name", "budget"), [("full", 1.0), ("streamingllm", 0.1), ("streamingllm", 1.0)])
def test_cuda_graph_tokens_equal_simple_path(cuda_adapter, name, budget):
    inputs = _inputs(cuda_adapter)
    assert (inputs["attention_mask"] == 0).any()  # left-padded
    ref = generate(cuda_adapter, policy(name, budget), inputs, STEPS)
    stats = {}
    out = generate_fast(cuda_adapter, policy(name, budget), inputs, STEPS, stats=stats)
    assert stats["mode"] == "graph", stats
    assert out.tokens == ref.tokens
    assert out.new_tokens == ref.new_tokens
    assert out.report.keep_counts.tolist() == ref.report.keep_counts.tolist()
    assert out.kv_bytes_kept == ref.kv_bytes_kept


@pytest.mark.gpu
def test_cuda_sequences_stopping_at_different_times(cuda_adapter):
    fake, inputs, stops_early = _early_eos(cuda_adapter, "streamingllm", 0.1)
    ref = generate(fake, policy("streamingllm", 0.1), inputs, STEPS)
    stats = {}
    out = generate_fast(fake, policy("streamingllm", 0.1), inputs, STEPS, stats=stats)
    assert stats["mode"] == "graph"
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens
    if stops_early:
        assert ref.new_tokens < STEPS and len({len(t) for t in ref.tokens}) == 2


@pytest.mark.gpu
def test_cuda_evicting_rule_falls_back_to_eager(cuda_adapter):
    """Without its graph-safe update, StreamingLLM's rolling cache evicts per token eagerly: eager steps,
    reserved buffers, the Triton kernel."""
    inputs = _inputs(cuda_adapter)
    ref = generate(cuda_adapter, policy("streamingllm", 0.1, decode="rolling"), inputs, STEPS)
    stats = {}
    rolling = policy("streamingllm", 0.1, decode="rolling")
    out = generate_fast(cuda_adapter, rolling, inputs, STEPS, stats=stats, graph_safe_rules=False)
    assert stats["mode"] == "eager" and "evicts per token" in stats["reason"] and stats["rule_update"] == "eager"
    assert out.tokens == ref.tokens


# the per-token rules with a graph-safe update: preset, decode rule
PER_TOKEN = [("h2o", "h2o"), ("elastic", "fixed_point"), ("streamingllm", "rolling")]


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "decode"), PER_TOKEN)
def test_cuda_graph_captures_per_token_rules(cuda_adapter, name, decode):
    """H2O, Elastic's fixed point and StreamingLLM's rolling cache inside the captured step."""
    inputs = _inputs(cuda_adapter)
    ref = generate(cuda_adapter, policy(name, 0.1, decode=decode), inputs, STEPS)
    stats = {}
    out = generate_fast(cuda_adapter, policy(name, 0.1, decode=decode), inputs, STEPS, stats=stats,
                        graph_safe_rules=True)
    assert stats["mode"] == "graph" and stats["rule_update"] == "static", stats
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_cuda_h2o_side_stream_equals_in_line(cuda_adapter, budget):
    """H2O's update on a side stream (vlcache/engine/side_stream.py) gives the in-line update's tokens, in the
    captured step and eagerly."""
    inputs = _inputs(cuda_adapter)
    outs = []
    for side_stream, cuda_graph in ((False, True), (True, True), (True, False)):
        pol = policy("h2o", budget, decode="h2o")
        stats = {}
        outs.append(generate_fast(cuda_adapter, pol, inputs, STEPS, stats=stats, side_stream=side_stream,
                                  cuda_graph=cuda_graph))  # fmt: skip
        assert stats["rule_update"] == "static" and (pol.decode_rule.side is not None) == side_stream
    assert outs[0].tokens == outs[1].tokens == outs[2].tokens


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "decode", "overlap"), [(*r, False) for r in PER_TOKEN] + [("h2o", "h2o", True)])
def test_cuda_graph_safe_rules_do_not_sync(cuda_adapter, name, decode, overlap):
    """The graph-safe update never waits for the GPU: CUDA's sync debug mode turns any synchronising call into
    an error (after an append, in every layer, twice; `overlap`: H2O's update on its side stream)."""
    from vlcache.engine.generate import prefill_and_compress

    pol = policy(name, 0.1, decode=decode)
    pre = prefill_and_compress(cuda_adapter, pol, _inputs(cuda_adapter))
    for layer in pre.cache.layers:
        layer.reserve(int(layer.length.max()) + 4)
    pol.decode_rule.prepare_static(pre.cache, **({"overlap": True} if overlap else {}))
    assert not overlap or pol.decode_rule.side is not None
    hq = cuda_adapter.text_config.num_attention_heads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            for layer_idx, layer in enumerate(pre.cache.layers):
                k = layer.keys[:, :, :1].clone()
                layer.update(k, k)
                q = torch.randn(k.shape[0], hq, 1, k.shape[-1], device=k.device)
                pol.decode_rule.on_token_static(layer_idx, q, pre.cache)
            if hasattr(pol.decode_rule, "on_step_static"):  # FixedPoint's updates, H2O's join, at the step's end
                pol.decode_rule.on_step_static(pre.cache)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# -- CPU: the same path, eagerly -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_adapter():
    return _adapter("cpu")


@pytest.mark.parametrize(
    ("name", "budget", "decode"),
    [("full", 1.0, "append"), ("streamingllm", 0.1, "append"), ("streamingllm", 0.1, "rolling")],
)
def test_cpu_eager_tokens_equal_simple_path(cpu_adapter, name, budget, decode, monkeypatch):
    if name == "full":  # the interpreter is slow over the full cache: the PyTorch fallback there
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = _inputs(cpu_adapter)
    ref = generate(cpu_adapter, policy(name, budget, decode=decode), inputs, 6)
    stats = {}
    out = generate_fast(cpu_adapter, policy(name, budget, decode=decode), inputs, 6, stats=stats,
                        graph_safe_rules=True)
    assert stats["mode"] == "eager"
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens
    # reserved once, max_new_tokens of room per row over the prompt's storage (ragged: each sequence's own
    # capacity, which may be less than the padded allocation after compression)
    assert stats["kv_bytes_reserved"] > stats["kv_bytes_prompt_storage"] >= out.kv_bytes_kept


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("budget", [0.1, 0.3, 1.0])
@pytest.mark.parametrize(("name", "decode"), PER_TOKEN)
def test_cpu_graph_safe_rules_tokens_equal_simple_path(cpu_adapter, name, decode, budget, batch):
    """The graph-safe per-token updates, run eagerly: the simple loop's tokens (batch 3: three prompt lengths)."""
    questions = QUESTIONS + ["How many?"] if batch == 3 else QUESTIONS
    inputs = cpu_adapter.build_inputs(questions, [[im] for im in random_images(batch, seed=7)])
    ref = generate(cpu_adapter, policy(name, budget, decode=decode), inputs, STEPS)
    stats = {}
    out = generate_fast(cpu_adapter, policy(name, budget, decode=decode), inputs, STEPS, stats=stats,
                        graph_safe_rules=True)
    assert stats["rule_update"] == ("static" if budget < 1 else None)
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens


def _embedded_batch():
    """The trained embedded model on the CPU and a batch of two synth_docvqa and two synth_count test samples."""
    from vlcache.data import generators
    from vlcache.models.load import embedded_checkpoint, load_model

    with open(os.path.join(os.path.dirname(__file__), "..", "conf", "model", "embedded.yaml")) as f:
        cfg = yaml.safe_load(f)
    if embedded_checkpoint(cfg) is None:
        pytest.skip("no embedded checkpoint")
    adapter = load_model(cfg, torch.device("cpu"))
    samples = [generators()[task]("test", i) for task in ("synth_docvqa", "synth_count") for i in range(2)]
    return adapter, adapter.build_inputs([s["question"] for s in samples], [[s["image"]] for s in samples])


def test_embedded_model_graph_safe_rules_tokens_equal_simple_path():
    """The trained embedded model on a few synth samples (its greedy answers are not one repeated token)."""
    adapter, inputs = _embedded_batch()
    for name, decode in PER_TOKEN:
        for budget in (0.1, 0.3):
            ref = generate(adapter, policy(name, budget, decode=decode), inputs, 16)
            stats = {}
            out = generate_fast(adapter, policy(name, budget, decode=decode), inputs, 16, stats=stats,
                                graph_safe_rules=True)
            assert stats["rule_update"] == "static"
            assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens, (name, budget)


def test_cpu_sequences_stopping_at_different_times(cpu_adapter, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fake, inputs, stops_early = _early_eos(cpu_adapter)
    ref = generate(fake, policy("full", 1.0), inputs, STEPS)
    out = generate_fast(fake, policy("full", 1.0), inputs, STEPS)
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens
    assert stops_early and ref.new_tokens < STEPS and len({len(t) for t in ref.tokens}) == 2


def test_reserve_appends_in_place():
    from vlcache.cache import CompressedLayer

    layer = CompressedLayer()
    k = torch.randn(2, 3, 5, 4)
    layer.update(k, k)
    layer.reserve(9)
    keys, length = layer.keys, layer.length
    for i in range(4):
        new = torch.full((2, 3, 1, 4), float(i))
        layer.update(new, new)
    assert layer.keys is keys and layer.length is length and layer.capacity == 9  # no reallocation
    assert layer.length.tolist() == [[9] * 3] * 2
    assert torch.equal(layer.keys[:, :, 5:, 0], torch.arange(4.0).expand(2, 3, 4))
    assert layer.positions[0, 0].tolist() == list(range(9))
    layer.sync_seen()
    assert layer.get_seq_length() == 9


# -- ragged storage: each sequence reserved at its own capacity (CompressedLayer.reserve_ragged) ------------------
def _ragged_vs_padded(adapter, inputs, name: str, budget: float, steps: int, **groups: str) -> tuple[dict, dict]:
    """The fused step's stats (ragged storage) and the module path's (padded), both checked against the simple
    loop's tokens."""
    ref = generate(adapter, policy(name, budget, **groups), inputs, steps)
    fused, padded = {}, {}
    out = generate_fast(adapter, policy(name, budget, **groups), inputs, steps, stats=fused)
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens, (name, budget)
    out = generate_fast(adapter, policy(name, budget, **groups), inputs, steps, stats=padded, fused=False)
    assert out.tokens == ref.tokens and padded["layout"] == "padded"
    return fused, padded


def test_cpu_ragged_storage_tokens_equal_simple_path(cpu_adapter):
    """VL-Cache keeps a share of each sequence's own prompt: three prompt lengths, three kept counts. The fused step
    stores each sequence at its own capacity, less than the padded layout (every sequence at the longest), with
    the simple loop's tokens."""
    inputs = cpu_adapter.build_inputs(QUESTIONS + ["How many?"], [[im] for im in random_images(3, seed=7)])
    fused, padded = _ragged_vs_padded(cpu_adapter, inputs, "vlcache", 0.3, STEPS)
    assert fused["step"] == "fused" and fused["layout"] == "ragged"
    assert fused["kv_bytes_prompt_storage"] < padded["kv_bytes_prompt_storage"]
    assert fused["kv_bytes_reserved"] - fused["kv_bytes_prompt_storage"] == (
        padded["kv_bytes_reserved"] - padded["kv_bytes_prompt_storage"]  # the same room for generated tokens
    )


def test_embedded_model_ragged_storage_tokens_equal_simple_path():
    """The trained embedded model, whose VL-Cache layer budgets differ per sequence (synth_docvqa and synth_count
    prompts): ragged storage, the simple loop's tokens, less memory than the padded layout."""
    adapter, inputs = _embedded_batch()
    for budget in (0.1, 0.3):
        fused, padded = _ragged_vs_padded(adapter, inputs, "vlcache", budget, 16)
        assert fused["step"] == "fused" and fused["layout"] == "ragged"
        assert fused["kv_bytes_prompt_storage"] < padded["kv_bytes_prompt_storage"]


@pytest.mark.parametrize("graph_safe_rules", [True, False])
def test_cpu_per_token_rule_keeps_padded_storage(cpu_adapter, graph_safe_rules):
    """H2O evicts per token (its static update or `on_token`), indexing rows as [B, Hkv, capacity]: padded."""
    inputs = _inputs(cpu_adapter)
    ref = generate(cpu_adapter, policy("h2o", 0.3, decode="h2o"), inputs, STEPS)
    stats = {}
    out = generate_fast(
        cpu_adapter, policy("h2o", 0.3, decode="h2o"), inputs, STEPS, stats=stats, graph_safe_rules=graph_safe_rules
    )
    assert stats["step"] == "fused" and stats["layout"] == "padded"
    assert stats["rule_update"] == ("static" if graph_safe_rules else "eager")
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens
