"""The fused prefill (vlcache/engine/fused_prefill.py): `rope_split` against float64 and transformers' own RoPE on
awkward shapes; the fused loop against the model's own forward through the framework (logits, every layer's
cache, the policy observer's queries and keys); and `generate` with it forced on against it off. The Triton forms
run under TRITON_INTERPRET=1 on the CPU (a kernel test file: `make test`) and natively on CUDA."""

import contextlib
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import preset, random_images
from fused_models import KINDS, tiny_lm
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vlcache.engine.fused_prefill as fp
from vlcache.cache import CompressedCache
from vlcache.engine.attention import ForwardContext, forward_context, prefill_mask
from vlcache.engine.fused_prefill import fused_prefill, prefill_unsupported_reason
from vlcache.engine.generate import generate
from vlcache.kernels.prefill_ops import rope_split
from vlcache.models.load import ADAPTERS
from vlcache.models.tiny import build_tiny
from vlcache.policies.policy import build_policy

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["torch"] + (["triton"] if (INTERPRET or torch.cuda.is_available()) else [])
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def _rtne(backend, dtype) -> bool:
    """Whether float32 -> bf16 rounds to nearest even, as on the GPU and in PyTorch (the interpreter truncates)."""
    return not (backend == "triton" and INTERPRET and dtype == torch.bfloat16)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the reference's largest magnitude."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# -- rope_split ---------------------------------------------------------------------------------------------------
def _rope_inputs(b, seq, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b * seq, (hq + 2 * hkv) * d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    ang = 3.0 * torch.randn(b * seq, d // 2, generator=g, dtype=torch.float64)
    ang = torch.cat((ang, ang), -1)  # transformers' cat((freqs, freqs)): the two halves share their angles
    cos, sin = (f(ang).to(dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    return qkv, cos, sin


SHAPES = [(1, 1, 4, 4, 64), (2, 13, 6, 2, 10), (3, 37, 8, 2, 128), (1, 300, 2, 1, 10)]  # (B, L, Hq, Hkv, D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "seq", "hq", "hkv", "d"), SHAPES)
def test_rope_split_against_float64(backend, dtype, b, seq, hq, hkv, d):
    qkv, cos, sin = _rope_inputs(b, seq, hq, hkv, d, dtype)
    q, k, v = rope_split(qkv, cos, sin, b, hq, hkv, backend=backend)
    assert q.shape == (b, hq, seq, d) and k.shape == v.shape == (b, hkv, seq, d)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    heads = qkv.double().cpu().view(b, seq, hq + 2 * hkv, d).transpose(1, 2)
    c, s = cos.double().cpu().view(b, 1, seq, d), sin.double().cpu().view(b, 1, seq, d)
    half = d // 2
    rot = heads * c + torch.cat((-heads[..., half:], heads[..., :half]), -1) * s
    tol = {torch.float32: 1e-6, torch.bfloat16: 1.6e-2 if _rtne(backend, dtype) else 3.2e-2}[dtype]
    assert _rel(q, rot[:, :hq]) < tol and _rel(k, rot[:, hq : hq + hkv]) < tol
    assert torch.equal(v.double().cpu(), heads[:, hq + hkv :])  # copied, not computed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "seq", "hq", "hkv", "d"), SHAPES[1:3])
def test_rope_split_rounds_as_transformers(backend, dtype, b, seq, hq, hkv, d):
    """The attention module's views of the projections and `apply_rotary_pos_emb`, bit for bit (bf16 under the
    interpreter, which truncates float32 -> bf16: within one unit in the last place)."""
    qkv, cos, sin = _rope_inputs(b, seq, hq, hkv, d, dtype, seed=1)
    q, k, v = rope_split(qkv, cos, sin, b, hq, hkv, backend=backend)
    heads = qkv.view(b, seq, hq + 2 * hkv, d).transpose(1, 2)  # what `q_proj(x).view(...).transpose(1, 2)` gives
    q_hf, k_hf = apply_rotary_pos_emb(
        heads[:, :hq], heads[:, hq : hq + hkv], cos.view(b, seq, d), sin.view(b, seq, d)
    )
    assert torch.equal(v, heads[:, hq + hkv :])
    if _rtne(backend, dtype):
        assert torch.equal(q, q_hf) and torch.equal(k, k_hf)
    else:  # truncating three roundings: a few units of 2^-8 at most, relative to the operands' scale
        assert _rel(q, q_hf) < 3.2e-2 and _rel(k, k_hf) < 3.2e-2


def test_rope_split_rejects_mismatched_shapes():
    qkv, cos, sin = _rope_inputs(2, 5, 6, 2, 10, torch.float32)
    with pytest.raises(ValueError, match="batch of 3"):
        rope_split(qkv, cos, sin, 3, 6, 2)
    with pytest.raises(ValueError, match="query and"):
        rope_split(qkv, cos[:, :8], sin[:, :8], 2, 6, 2)


# -- the fused loop against the model's own forward ----------------------------------------------------------------
def _prefill(model, ids, positions, valid, fused: bool, **kw):
    """A prompt through `model` with the framework's attention and a fresh cache (the fused loop or the model's
    own forward); returns the last position's logits, the cache and the observer's (layer, query, key) calls."""
    cache = CompressedCache(model.config.num_hidden_layers)
    seen = []
    mask = None if bool(valid.all()) else prefill_mask(valid)
    ctx = ForwardContext(cache=cache, prefill_mask=mask, on_prefill=lambda i, q, k: seen.append((i, q.clone(), k)))
    with torch.inference_mode(), forward_context(ctx), (fused_prefill(model) if fused else contextlib.nullcontext()):
        out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    **kw)
    return out.logits[:, -1], cache, seen


def _prompt(b=3, seq=13, seed=0):
    """A left-padded batch of odd length: row i starts 2·i tokens later (positions count from its first token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (b, seq), generator=g)
    valid = torch.arange(seq) >= 2 * torch.arange(b)[:, None]
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    return ids.to(DEVICE), positions.to(DEVICE), valid.to(DEVICE)


def _as_transformers(monkeypatch):
    """The fused loop with transformers' own operations: the PyTorch forms, and SwiGLU as `act_fn(gate(x)) *
    up(x)` computes it (`silu_mul`'s PyTorch form applies SiLU to a strided slice, whose CPU kernel can round a
    float32 differently in the last place)."""
    def silu_mul(gu):
        inter = gu.shape[1] // 2
        return F.silu(gu[:, :inter].contiguous()) * gu[:, inter:].contiguous()

    monkeypatch.setattr(fp, "rms_norm", functools.partial(fp.rms_norm, backend="torch"))
    monkeypatch.setattr(fp, "rope_split", functools.partial(fp.rope_split, backend="torch"))
    monkeypatch.setattr(fp, "silu_mul", silu_mul)


def _compare(ref, out, close):
    (l_ref, c_ref, s_ref), (l_out, c_out, s_out) = ref, out
    assert close(l_out, l_ref)
    for a, b in zip(c_ref.layers, c_out.layers):
        assert torch.equal(a.length, b.length) and torch.equal(a.positions, b.positions) and a.seen == b.seen
        assert close(b.keys, a.keys) and close(b.values, a.values)
    # the observer: once per layer, in order, with the same post-RoPE queries and (cached) keys
    assert [i for i, _, _ in s_out] == [i for i, _, _ in s_ref] == list(range(len(c_ref.layers)))
    for (_, q_ref, k_ref), (_, q, k) in zip(s_ref, s_out):
        assert q.shape == q_ref.shape and k.shape == k_ref.shape
        assert close(q, q_ref) and close(k, k_ref)


@pytest.mark.skipif(DEVICE != "cpu", reason="bit equality of the PyTorch forms is a CPU property")
@pytest.mark.parametrize("kind", KINDS)
def test_fused_loop_is_the_model_forward_bit_for_bit(kind, monkeypatch):
    """With transformers' operations in each fused pass, the loop is the model's forward exactly (float32, CPU):
    the concatenated GEMMs, the head-major layout and the direct call of the attention function change nothing."""
    _as_transformers(monkeypatch)
    model = tiny_lm(kind)
    ids, positions, valid = _prompt()
    _compare(_prefill(model, ids, positions, valid, False), _prefill(model, ids, positions, valid, True), torch.equal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_loop_equals_the_model_forward(kind, dtype):
    """The kernels as they run here (Triton under the interpreter and on CUDA): logits, cache and observer within
    float32 rounding, and within bf16 rounding (a few units of 2^-8, or truncation's under the interpreter)."""
    model = tiny_lm(kind, dtype=dtype).to(DEVICE)
    ids, positions, valid = _prompt(seed=1)
    tol = 2e-6 if dtype == torch.float32 else (8e-2 if INTERPRET else 3e-2)
    ref = _prefill(model, ids, positions, valid, False)
    out = _prefill(model, ids, positions, valid, True)
    _compare(ref, out, lambda a, b: _rel(a, b) < tol)
    # the last position's greedy token is a function of the prompt, not of the loop (float32)
    if dtype == torch.float32:
        assert torch.equal(out[0].argmax(-1), ref[0].argmax(-1))


def test_inputs_embeds_default_positions_and_restore():
    """`inputs_embeds` and no positions (counted from 0, as transformers does) give what `input_ids` does; the
    decoder's own forward is back after the context, also when the body raised."""
    model = tiny_lm("mistral").to(DEVICE)
    text = model.get_decoder()
    ids, _, _ = _prompt(b=2, seq=9)
    cache = CompressedCache(3)
    with torch.inference_mode(), forward_context(ForwardContext(cache=cache)):
        ref = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        for use_ids in (True, False):
            cache = CompressedCache(3)
            feed = {"input_ids": ids} if use_ids else {"inputs_embeds": text.embed_tokens(ids)}
            with forward_context(ForwardContext(cache=cache)), fused_prefill(model):
                assert "forward" in text.__dict__
                out = model(**feed, past_key_values=cache, use_cache=True)
            assert _rel(out.logits, ref) < 2e-6 and cache.layers[0].seen == 9
            assert out.past_key_values is cache
        assert "forward" not in text.__dict__
        with pytest.raises(RuntimeError, match="boom"), fused_prefill(model):
            raise RuntimeError("boom")
        assert "forward" not in text.__dict__
        with fused_prefill(model), pytest.raises(NotImplementedError, match="output_hidden_states"):
            model(input_ids=ids, output_hidden_states=True)


def test_unsupported_models_say_why():
    model = tiny_lm("llama")
    assert prefill_unsupported_reason(model) is None
    handle = model.model.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert "hooks on layers.1.mlp" in prefill_unsupported_reason(model)
    handle.remove()
    model.config._attn_implementation = "sdpa"
    assert "attention implementation 'sdpa'" in prefill_unsupported_reason(model)
    with pytest.raises(ValueError, match="fused prefill does not support"), fused_prefill(model):
        pass
    qwen_vl, _ = build_tiny("qwen2_vl", seed=0)
    assert "model_type" in prefill_unsupported_reason(qwen_vl)


# -- through the engine -----------------------------------------------------------------------------------------------
def test_generate_with_the_fused_prefill_forced_on(monkeypatch):
    """A left-padded LLaVA-NeXT batch under VL-Cache at budget 0.5 (its observer scores the prefill's queries): the
    fused prefill forced on (`fused_prefill = True`, here on the CPU) keeps the same entries and greedy tokens as
    the model's own forward; off by default on the CPU; and an error where the model cannot take it."""
    calls = []
    inner = fp.fused_forward
    monkeypatch.setattr(fp, "fused_forward", lambda *a, **kw: calls.append(1) or inner(*a, **kw))
    model, processor = build_tiny("llava_next", seed=0)  # a Mistral language model
    adapter = ADAPTERS["llava_next"](model.to(DEVICE), processor, DEVICE)
    questions = ["What is the total?", "Which colour is the largest shape, and where is it?"]
    inputs = adapter.build_inputs(questions, [[im] for im in random_images(2, seed=0)])
    assert (inputs["attention_mask"] == 0).any()
    adapter.fused_prefill = False
    ref = generate(adapter, build_policy(preset("vlcache"), 0.5), inputs, 6)
    assert not calls
    adapter.fused_prefill = True
    out = generate(adapter, build_policy(preset("vlcache"), 0.5), inputs, 6)
    assert calls == [1]  # the prompt only: decoding runs the model's own forward
    assert out.tokens == ref.tokens
    # the same selection, but for a near-tie flipped by float32 rounding (one swap, under the interpreter)
    same = total = 0
    for a, b in zip(out.kept_positions, ref.kept_positions):
        for row_a, row_b in zip(a.flatten(0, 1).tolist(), b.flatten(0, 1).tolist()):
            kept_a, kept_b = {p for p in row_a if p >= 0}, {p for p in row_b if p >= 0}
            same, total = same + len(kept_a & kept_b), total + len(kept_b)
    assert total > 0 and same >= 0.99 * total, (same, total)
    if DEVICE == "cpu":
        del adapter.fused_prefill  # the class default: the CPU keeps the model's own forward
        generate(adapter, build_policy(preset("full"), 1.0), inputs, 1)
        assert calls == [1]
    qwen_vl, qwen_processor = build_tiny("qwen2_vl", seed=0)
    qwen = ADAPTERS["qwen2_vl"](qwen_vl, qwen_processor, "cpu")
    qwen.fused_prefill = True
    q_inputs = qwen.build_inputs(["How many?"], [random_images(1, seed=1)])
    with pytest.raises(ValueError, match="fused_prefill=True.*model_type"):
        generate(qwen, build_policy(preset("full"), 1.0), q_inputs, 1)
