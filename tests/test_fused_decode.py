"""The fused decode step inside `generate_fast`: which models take it, that it leaves the model as it was, and
that every architecture's greedy tokens equal the simple loop's through it (PyTorch forms on the CPU; the
kernels themselves are tested in tests/test_fused_ops.py)."""

import numpy as np
import pytest
import torch
from conftest import preset
from fused_models import tiny_lm
from PIL import Image

from vlcache.engine.fast_decode import generate_fast
from vlcache.engine.fused_decode import fuse_projections, unsupported_reason
from vlcache.engine.generate import generate
from vlcache.models.load import ADAPTERS
from vlcache.models.tiny import FAMILIES, build_tiny
from vlcache.policies.policy import build_policy

FUSED_FAMILIES = {"llava": "llama", "llava_next": "mistral", "llava_onevision": "qwen2"}


def test_fusing_shares_storage_and_keeps_the_model_forward():
    model = tiny_lm("qwen2")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    params = sum(p.numel() for p in model.parameters())
    layers = fuse_projections(model)
    att = model.model.layers[1].self_attn
    assert att.k_proj.weight.untyped_storage().data_ptr() == layers[1].w_qkv.untyped_storage().data_ptr()
    assert att.v_proj.bias.untyped_storage().data_ptr() == layers[1].b_qkv.untyped_storage().data_ptr()
    assert torch.equal(layers[1].w_qkv[-att.v_proj.weight.shape[0] :], att.v_proj.weight)
    assert sum(p.numel() for p in model.parameters()) == params
    assert fuse_projections(model) is layers  # once per model
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)


def test_unsupported_models_say_why():
    model, _ = build_tiny("qwen2_vl", seed=0)
    assert "model_type" in unsupported_reason(model)
    assert unsupported_reason(tiny_lm("mistral")) is None


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (300 + 17 * i, 340 - 9 * i, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_tokens_equal_the_simple_loop(family):
    """A left-padded batch of three at budget 0.5: the fused step where the language model is Llama-family, the
    model's own modules otherwise (and `fused=True` there is an error naming why)."""
    model, processor = build_tiny(family, seed=0)
    adapter = ADAPTERS[family](model, processor, "cpu")
    questions = ["What is the total?", "Which colour is the largest shape, and where is it?", "How many?"]
    inputs = adapter.build_inputs(questions, [[im] for im in _images(3)])
    assert (inputs["attention_mask"] == 0).any()
    pol = preset("vlcache")
    ref = generate(adapter, build_policy(pol, 0.5), inputs, 8)
    stats = {}
    out = generate_fast(adapter, build_policy(pol, 0.5), inputs, 8, stats=stats)
    assert out.tokens == ref.tokens and out.new_tokens == ref.new_tokens
    if family in FUSED_FAMILIES:
        assert stats["step"] == "fused" and stats["step_reason"] is None
        assert adapter.text_config.model_type == FUSED_FAMILIES[family]
        unfused = generate_fast(adapter, build_policy(pol, 0.5), inputs, 8, fused=False)
        assert unfused.tokens == out.tokens
    else:
        assert stats["step"] == "modules" and "model_type" in stats["step_reason"]
        with pytest.raises(ValueError, match="fused decode step cannot run this model"):
            generate_fast(adapter, build_policy(pol, 0.5), inputs, 8, fused=True)


def test_weights_replaced_after_fusing_are_fused_again():
    """`model.to(dtype)` gives the projections new storage: the cached fused weights must follow."""
    model = tiny_lm("llama")
    first = fuse_projections(model)
    model.to(torch.float64)
    again = fuse_projections(model)
    assert again is not first and again[0].w_qkv.dtype == torch.float64
    assert again[0].w_qkv.data_ptr() == model.model.layers[0].self_attn.q_proj.weight.data_ptr()
