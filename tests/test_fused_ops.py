"""The fused decode step's kernels (RMSNorm with the residual add, SwiGLU, RoPE with the cache append) against
float64 references, on awkward shapes; and the whole fused step against the model's own modules. The Triton
forms run under TRITON_INTERPRET=1 on the CPU (a kernel test file: `make test`) and natively on CUDA."""

import os

import pytest
import torch
from fused_models import KINDS, module_step, ragged_cache, tiny_lm

from vlcache.engine.fused_decode import FusedDecoder
from vlcache.kernels.fused_ops import rms_norm, rms_norm_torch, rope_append, silu_mul

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["torch"] + (["triton"] if (INTERPRET or torch.cuda.is_available()) else [])
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # bf16: a few roundings of 2^-8


def _rtne(backend, dtype) -> bool:
    """Whether float32 -> bf16 rounds to nearest even, as on the GPU and in PyTorch (the interpreter truncates)."""
    return not (backend == "triton" and INTERPRET and dtype == torch.bfloat16)


def _rand(*shape, dtype, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


def _close(out, ref, dtype):
    err = (out.double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)
    assert float(err) < TOL[dtype], float(err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "n"), [(1, 4096), (3, 97), (5, 200)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(backend, dtype, b, n, residual):
    x, r, w = _rand(b, n, dtype=dtype), _rand(b, n, dtype=dtype), _rand(n, dtype=dtype, scale=0.5) + 1
    h, y = rms_norm(x, w, 1e-6, residual=r if residual else None, backend=backend)
    h64 = x.double().cpu() + (r.double().cpu() if residual else 0)
    assert torch.allclose(h.double().cpu(), h64, rtol=TOL[dtype], atol=0)
    ref = w.double().cpu() * h64 / torch.sqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6)
    _close(y, ref, dtype)
    # transformers' roundings: at most one unit in the last place from its own operations (the mean's order)
    h_t, y_t = rms_norm_torch(x, w, 1e-6, r if residual else None)
    exact = _rtne(backend, dtype)
    assert torch.equal(h, h_t) or not exact
    ulp = (2.0**-7 if exact else 2.0**-5) if dtype == torch.bfloat16 else 2.0**-20
    assert float(((y.double() - y_t.double()).abs() / y_t.double().abs().clamp(min=1e-3)).max()) <= ulp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "inter"), [(1, 14336), (3, 37), (4, 2500)])
def test_silu_mul(backend, dtype, b, inter):
    gu = _rand(b, 2 * inter, dtype=dtype, scale=3.0)
    out = silu_mul(gu, backend=backend)
    g, u = gu.double().cpu().split(inter, dim=1)
    _close(out, g * torch.sigmoid(g) * u, dtype)


def _rope_reference(qkv, cos, sin, keys, values, length, positions, seen, hq):
    """float64, one (sequence, head) at a time: the rotate-half RoPE, then each KV row's append."""
    B, hkv, cap, D = keys.shape
    half = D // 2
    heads = qkv.double().cpu().view(B, hq + 2 * hkv, D)
    c, s = cos.double().cpu(), sin.double().cpu()
    k_ref, v_ref, p_ref, n_ref = (t.double().cpu().clone() for t in (keys, values, positions, length))
    q_ref = torch.empty(B, hq, 1, D, dtype=torch.float64)
    for b in range(B):
        for j in range(hq + hkv):
            x = heads[b, j]
            rot = torch.cat((-x[half:], x[:half])) * s[b] + x * c[b]
            if j < hq:
                q_ref[b, j, 0] = rot
                continue
            h = j - hq
            n = int(length[b, h])
            if n < cap:
                k_ref[b, h, n], v_ref[b, h, n] = rot, heads[b, hq + hkv + h]
                p_ref[b, h, n], n_ref[b, h] = int(seen) - 1, n + 1
    return q_ref, k_ref, v_ref, p_ref, n_ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hkv", "d", "cap"), [(1, 32, 8, 128, 9), (3, 6, 2, 10, 7), (2, 7, 7, 64, 5)])
def test_rope_append(backend, dtype, b, hq, hkv, d, cap):
    qkv = _rand(b, (hq + 2 * hkv) * d, dtype=dtype)
    ang = _rand(b, d // 2, dtype=torch.float64, scale=3.0)
    cos, sin = (f(torch.cat((ang, ang), -1)).to(dtype) for f in (torch.cos, torch.sin))
    keys, values = _rand(b, hkv, cap, d, dtype=dtype), _rand(b, hkv, cap, d, dtype=dtype)
    length = torch.randint(0, cap + 1, (b, hkv)).to(DEVICE)
    length[0, 0] = cap  # a full row: left as it is
    positions = torch.randint(0, 100, (b, hkv, cap)).to(DEVICE)
    seen = torch.tensor(1234, device=DEVICE)
    ref = _rope_reference(qkv, cos, sin, keys, values, length, positions, seen, hq)
    q = rope_append(qkv, cos, sin, keys, values, length, positions, seen, hq, backend=backend)
    _close(q, ref[0], dtype)
    _close(keys, ref[1], dtype)
    assert torch.equal(values.double().cpu(), ref[2])  # copied, not computed
    assert torch.equal(positions.cpu(), ref[3].long()) and torch.equal(length.cpu(), ref[4].long())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("caps", [[7, 3, 12], [5, 0, 9]])
def test_rope_append_ragged(backend, dtype, caps):
    """Ragged storage (`bounds`): each sequence's span after the append equals the padded `rope_append` run on that
    sequence alone at its own capacity, on the same data: the key and value at slot `bounds[b] + length`, its
    position, the length advanced, a full row left as it was, and no slot of another sequence touched."""
    hq, hkv, d = 6, 2, 10
    b = len(caps)
    qkv = _rand(b, (hq + 2 * hkv) * d, dtype=dtype)
    ang = _rand(b, d // 2, dtype=torch.float64, scale=3.0)
    cos, sin = (f(torch.cat((ang, ang), -1)).to(dtype) for f in (torch.cos, torch.sin))
    keys_pad, values_pad = _rand(b, hkv, max(caps), d, dtype=dtype), _rand(b, hkv, max(caps), d, dtype=dtype)
    positions_pad = torch.randint(0, 100, (b, hkv, max(caps))).to(DEVICE)
    length = torch.stack([torch.randint(0, c + 1, (hkv,)) for c in caps]).to(DEVICE)
    length[0, 0] = caps[0]  # a full row: left as it is
    seen = torch.tensor(1234, device=DEVICE)
    pack = lambda t: torch.cat([t[i, :, :c] for i, c in enumerate(caps)], dim=1)[None].contiguous()  # noqa: E731
    keys, values, positions = pack(keys_pad), pack(values_pad), pack(positions_pad)
    full_row = keys[0, 0, : caps[0]].clone()
    bounds = torch.tensor([0, *caps]).cumsum(0).to(DEVICE)
    ragged_length = length.clone()
    q = rope_append(qkv, cos, sin, keys, values, ragged_length, positions, seen, hq, backend=backend, bounds=bounds)
    assert torch.equal(keys[0, 0, : caps[0]], full_row) and int(ragged_length[0, 0]) == caps[0]
    for i, c in enumerate(caps):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if c == 0:  # no room at all: nothing written, the length stays 0
            assert (ragged_length[i] == 0).all()
            continue
        one = slice(i, i + 1)
        k1, v1, p1 = (t[one, :, :c].clone() for t in (keys_pad, values_pad, positions_pad))
        n1 = length[one].clone()
        q1 = rope_append(qkv[one], cos[one], sin[one], k1, v1, n1, p1, seen, hq, backend=backend)
        assert torch.equal(q[one], q1)
        assert torch.equal(keys[0, :, lo:hi], k1[0]) and torch.equal(values[0, :, lo:hi], v1[0])
        assert torch.equal(positions[0, :, lo:hi], p1[0]) and torch.equal(ragged_length[one], n1)
    assert torch.equal(ragged_length, torch.minimum(length + 1, torch.tensor(caps, device=DEVICE)[:, None]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_append_rounds_as_transformers(backend):
    """bf16: the rotation rounds each product and the sum as `q * cos + rotate_half(q) * sin` does."""
    if not _rtne(backend, torch.bfloat16):
        pytest.skip("the Triton interpreter truncates float32 -> bf16; the GPU rounds to nearest even")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, hq, hkv, d, cap = 3, 4, 2, 64, 6
    qkv = _rand(b, (hq + 2 * hkv) * d, dtype=torch.bfloat16, seed=3)
    ang = _rand(b, d // 2, dtype=torch.float32, scale=5.0, seed=4)
    cos, sin = (f(torch.cat((ang, ang), -1)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    keys = torch.zeros(b, hkv, cap, d, dtype=torch.bfloat16, device=DEVICE)
    values, positions = torch.zeros_like(keys), torch.zeros(b, hkv, cap, dtype=torch.long, device=DEVICE)
    length = torch.zeros(b, hkv, dtype=torch.long, device=DEVICE)
    q = rope_append(qkv, cos, sin, keys, values, length, positions, torch.tensor(1, device=DEVICE), hq,
                    backend=backend)
    heads = qkv.view(b, hq + 2 * hkv, d)
    q_hf, k_hf = apply_rotary_pos_emb(heads[:, :hq, None], heads[:, hq : hq + hkv, None], cos[:, None], sin[:, None])
    assert torch.equal(q, q_hf) and torch.equal(keys[:, :, :1], k_hf)


@pytest.mark.parametrize(("kind", "batch"), [(k, 3) for k in KINDS] + [(KINDS[0], 21)])
def test_fused_step_equals_module_step(kind, batch):
    """Three decode steps of a ragged batch: the fused step's logits and cache equal the module path's (float32;
    with TRITON_INTERPRET=1 or on CUDA the Triton kernels run, else the PyTorch forms; under the interpreter 21
    rows take the projections' 64-row tier)."""
    model = tiny_lm(kind).to(DEVICE)
    ref_cache = ragged_cache(model, batch=batch, prompt=11, room=4)
    cache = ragged_cache(model, batch=batch, prompt=11, room=4)
    for a, b in zip(ref_cache.layers, cache.layers):
        a.length, b.length = a.length.to(DEVICE), b.length.to(DEVICE)
    ref_cache.layers = [_to(layer) for layer in ref_cache.layers]
    cache.layers = [_to(layer) for layer in cache.layers]
    seen = cache.share_seen()
    decoder = FusedDecoder(model)
    tokens = torch.tensor([5, 17, 96] + [(7 * i) % 97 for i in range(batch - 3)], device=DEVICE)
    # left-padded rows start their positions later
    positions = torch.tensor([11, 9, 4] + [11 - i % 8 for i in range(batch - 3)], device=DEVICE)
    with torch.inference_mode():
        for _ in range(3):
            ref = module_step(model, ref_cache, tokens, positions)
            seen.add_(1)
            out = decoder(tokens, positions[:, None], cache, seen)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), float((out - ref).abs().max())
            for a, b in zip(ref_cache.layers, cache.layers):
                assert torch.equal(a.length, b.length) and torch.equal(a.positions, b.positions)
                assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
            tokens, positions = ref.argmax(-1), positions + 1


def _to(layer):
    for name in ("keys", "values", "length", "positions", "seen_device"):
        setattr(layer, name, getattr(layer, name).to(DEVICE))
    layer.device = torch.device(DEVICE)
    return layer


@pytest.mark.parametrize("kind", KINDS)
def test_fused_step_on_ragged_storage_equals_module_step(kind):
    """The fused step on a ragged cache (`reserve_ragged`: each sequence at its own capacity) against the module
    path on the padded one: the same logits, and each row's valid entries, positions and lengths."""
    model = tiny_lm(kind).to(DEVICE)
    ref_cache = ragged_cache(model, batch=3, prompt=11, room=4)
    cache = ragged_cache(model, batch=3, prompt=11, room=4)
    ref_cache.layers = [_to(layer) for layer in ref_cache.layers]
    cache.layers = [_to(layer) for layer in cache.layers]
    for layer in cache.layers:  # re-packed from ragged_cache's padded reservation
        layer.reserve_ragged(3)
    assert any(len(set(layer.bounds.diff().tolist())) > 1 for layer in cache.layers)  # capacities differ
    seen = cache.share_seen()
    decoder = FusedDecoder(model)
    tokens = torch.tensor([5, 17, 96], device=DEVICE)
    positions = torch.tensor([11, 9, 4], device=DEVICE)
    with torch.inference_mode():
        for _ in range(3):  # the third fills the rows that were longest in their sequence
            ref = module_step(model, ref_cache, tokens, positions)
            seen.add_(1)
            out = decoder(tokens, positions[:, None], cache, seen)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), float((out - ref).abs().max())
            for a, r in zip(ref_cache.layers, cache.layers):
                assert torch.equal(a.length, r.length)
                for i in range(3):
                    lo = int(r.bounds[i])
                    for h in range(a.length.shape[1]):
                        n = int(a.length[i, h])
                        assert torch.equal(a.positions[i, h, :n], r.positions[0, h, lo : lo + n])
                        assert torch.allclose(a.keys[i, h, :n], r.keys[0, h, lo : lo + n], atol=1e-5)
                        assert torch.allclose(a.values[i, h, :n], r.values[0, h, lo : lo + n], atol=1e-5)
            tokens, positions = ref.argmax(-1), positions + 1
