"""Decode attention over the ragged cache: Triton kernel (interpreter on the CPU, native on CUDA) and the
PyTorch fallback against a float64 reference, with per-(sequence, KV head) lengths, GQA and split-K."""

import os

import pytest
import torch

from vlcache.kernels.decode_attention import DecodeConfig, decode_attention, num_splits

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BACKENDS = ["torch"] + (["triton"] if (INTERPRET or torch.cuda.is_available()) else [])
DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRET) else "cpu"


def reference(q, k, v, length, scale):
    """float64, one (sequence, query head) at a time over its KV head's first `length` entries."""
    b, hq, _, d = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(b, hq, 1, d, dtype=torch.float64)
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    for i in range(b):
        for h in range(hq):
            n = int(length[i, h // group])
            if n == 0:
                continue
            s = (q[i, h, 0] @ k[i, h // group, :n].T) * scale
            out[i, h, 0] = torch.softmax(s, -1) @ v[i, h // group, :n]
    return out


def rel_err(out, ref):
    """Largest relative error over (sequence, head) rows, so a short row cannot hide behind a long one."""
    diff = (out.double().cpu() - ref).norm(dim=-1)
    return float((diff / ref.norm(dim=-1).clamp(min=1e-30)).max())


TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


def _inputs(b, hkv, group, cap, d, dtype, lengths, seed=None, backend="triton"):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ())))
    q = torch.randn(b, 1, hkv * group, d, generator=g).transpose(1, 2)  # non-contiguous, as in transformers
    k = torch.randn(b, hkv, cap, d, generator=g)
    v = torch.randn(b, hkv, cap, d, generator=g)
    k[..., :3] *= 4  # peaked logits: a wrong max or a missed key shows
    q, k, v = (t.to(dtype).to(DEVICE) for t in (q, k, v))
    # the spare room past each row's length holds garbage: the kernel must never read it (NaN would show);
    # the fallback reads it under a mask, so it gets large finite values
    valid = (torch.arange(cap) < lengths[..., None])[..., None].to(DEVICE)
    junk = torch.tensor(float("nan") if backend == "triton" else 1e3, dtype=dtype, device=DEVICE)
    k, v = torch.where(valid, k, junk), torch.where(valid, v, junk)
    return q, k, v, lengths.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 7])
def test_ragged_lengths_gqa(backend, dtype, group):
    b, hkv, cap, d = 3, 2, 203, 64
    lengths = torch.tensor([[1, 203], [117, 64], [33, 2]])  # odd, length 1, full, exactly one block
    q, k, v, length = _inputs(b, hkv, group, cap, d, dtype, lengths, backend=backend)
    scale = d**-0.5
    ref = reference(q, k, v, length, scale)
    out = decode_attention(q, k, v, length, scale, backend=backend)
    assert out.shape == (b, hkv * group, 1, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_cache_split_k(backend, dtype):
    """Caps of a few thousand keys: several splits per row, rows whose length leaves splits empty."""
    b, hkv, group, cap, d = 1, 2, 4, 2500, 128
    lengths = torch.tensor([[2500, 1737]])
    if backend == "triton":
        assert num_splits(b, hkv, cap, torch.device(DEVICE)) > 1  # split-K active by default
    q, k, v, length = _inputs(b, hkv, group, cap, d, dtype, lengths, backend=backend)
    ref = reference(q, k, v, length, 0.1)
    out = decode_attention(q, k, v, length, 0.1, backend=backend)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_split_counts_agree(splits):
    """Any number of splits (one: no combine launch; more splits than key blocks: empty splits)."""
    b, hkv, group, cap, d = 2, 3, 2, 390, 80  # a head dim that is not a power of two
    lengths = torch.tensor([[390, 1, 200], [77, 129, 64]])
    q, k, v, length = _inputs(b, hkv, group, cap, d, torch.float32, lengths)
    ref = reference(q, k, v, length, d**-0.5)
    out = decode_attention(q, k, v, length, backend="triton", splits=splits)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [DecodeConfig(block_n=16, num_warps=2, waves=1), DecodeConfig(block_n=32)])
def test_launch_configs_agree(dtype, config):
    """Other configurations the sweep (experiments/decode_kernel_sweep.py) times: small tiles, one wave."""
    b, hkv, group, cap, d = 2, 2, 4, 300, 128
    lengths = torch.tensor([[300, 17], [1, 150]])
    q, k, v, length = _inputs(b, hkv, group, cap, d, dtype, lengths)
    ref = reference(q, k, v, length, d**-0.5)
    out = decode_attention(q, k, v, length, backend="triton", config=config)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_row_gives_zero(backend):
    lengths = torch.tensor([[0, 5]])
    q, k, v, length = _inputs(1, 2, 2, 16, 16, torch.float32, lengths, seed=0, backend=backend)
    out = decode_attention(q, k, v, length, backend=backend)
    assert torch.equal(out[0, :2].cpu(), torch.zeros(2, 1, 16))
    ref = reference(q, k, v, length, 16**-0.5)
    assert rel_err(out[:, 2:], ref[:, 2:]) < TOL[torch.float32]


def test_bad_shapes():
    q = torch.randn(1, 4, 1, 16)
    k = torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError):
        decode_attention(q, k, k, torch.ones(1, 3, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError):
        decode_attention(q, k[:, :2], k[:, :2], torch.ones(1, 3, dtype=torch.long), backend="torch")


# -- ragged storage (CompressedLayer.reserve_ragged): k/v [1, Hkv, T, D], sequence b at slots [bounds[b], bounds[b+1])
def _ragged_inputs(caps, lengths, hkv, group, d, dtype, backend, seed=None):
    """Random padded inputs at the largest row capacity, then each sequence's first `caps[b]` slots packed end to
    end into `[1, Hkv, T, D]`; slots past each row's length hold junk (as in `_inputs`)."""
    q, k, v, _ = _inputs(len(caps), hkv, group, max(caps), d, dtype, lengths.clamp(max=max(caps)), seed, backend)
    pack = lambda t: torch.cat([t[b, :, :c] for b, c in enumerate(caps)], dim=1)[None].contiguous()  # noqa: E731
    bounds = torch.tensor([0, *caps], dtype=torch.long).cumsum(0).to(DEVICE)
    return q, (k, v), (pack(k), pack(v)), bounds, lengths.to(DEVICE)


RAGGED_CASES = [
    # caps differ per sequence; rows of length 0; a row at full capacity; odd lengths; a length past its own row's
    # capacity (clamped to it, so the next sequence's entries are never read)
    ([37, 5, 203], [[37, 0], [3, 5], [0, 117]]),
    ([64, 0, 129], [[1, 64], [0, 0], [129, 77]]),
    ([9, 150, 12], [[20, 0], [149, 150], [12, 11]]),
]


@pytest.mark.parametrize(
    ("backend", "splits"), [(b, None) for b in BACKENDS] + [("triton", s) for s in (1, 3) if "triton" in BACKENDS]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize(("caps", "lengths"), RAGGED_CASES)
def test_ragged_bounds(backend, splits, dtype, group, caps, lengths):
    """Each sequence over its own span of the packed storage equals the float64 reference over its padded rows
    (Triton: the default split count, one split, three)."""
    hkv, d = 2, 40
    lengths = torch.tensor(lengths)
    q, (k_pad, v_pad), (k, v), bounds, length = _ragged_inputs(caps, lengths, hkv, group, d, dtype, backend)
    clamped = torch.minimum(lengths, torch.tensor(caps)[:, None])
    ref = reference(q, k_pad, v_pad, clamped, d**-0.5)
    kw = dict(backend=backend, bounds=bounds, splits=splits)
    for max_cap in (max(caps), None):  # given (no host read, as the fused step passes it), or read from bounds
        out = decode_attention(q, k, v, length, max_cap=max_cap, **kw)
        assert out.shape == (len(caps), hkv * group, 1, d) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[dtype]
        empty = (clamped == 0).repeat_interleave(group, dim=1)
        assert (out[empty.to(DEVICE)] == 0).all()


def test_ragged_bad_bounds():
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(1, 2, 8, 16)
    length = torch.ones(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="bounds"):
        decode_attention(q, k, k, length, backend="torch", bounds=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="ragged"):
        decode_attention(
            q, k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), length, backend="torch", bounds=torch.tensor([0, 4, 8])
        )


# -- rope_append_attention: rope_append's work and the attention over its result in one launch ---------------------
def _unpack(t, bounds, caps):
    """Packed `[1, Hkv, T, ...]` rows back to padded `[B, Hkv, max cap, ...]` (zeros past each capacity)."""
    out = t.new_zeros(len(caps), t.shape[1], max(caps), *t.shape[3:])
    for b, c in enumerate(caps):
        out[b, :, :c] = t[0, :, int(bounds[b]) : int(bounds[b]) + c]
    return out


def _step_inputs(b, hq, hkv, d, dtype):
    """A fused q/k/v projection row per sequence, RoPE's cos and sin, and the token count."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    qkv = (torch.randn(b, (hq + 2 * hkv) * d, generator=g) * 2).to(dtype).to(DEVICE)
    angle = torch.randn(b, d // 2, generator=g) * 3
    cos, sin = (f(torch.cat([angle, angle], -1)).to(dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    return qkv, cos, sin, torch.tensor(301, device=DEVICE)


APPEND_CASES = [  # (caps per sequence, lengths [B, Hkv]): empty rows, full rows (no room: nothing appended), odd;
    # the first has one capacity, so it is also the padded case
    ([37, 37, 37], [[0, 36], [37, 5], [20, 1]]),
    ([37, 5, 203], [[37, 0], [3, 5], [0, 117]]),
    ([64, 0, 129], [[1, 64], [0, 0], [128, 77]]),
]


@pytest.mark.parametrize(
    ("backend", "splits"), [("torch", None)] + [("triton", s) for s in (None, 1, 3) if "triton" in BACKENDS]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("group", "d"), [(1, 40), (4, 10)])
@pytest.mark.parametrize(
    ("ragged", "caps", "lengths"), [(False, *APPEND_CASES[0])] + [(True, *c) for c in APPEND_CASES]
)
def test_rope_append_attention(backend, splits, dtype, group, d, ragged, caps, lengths):
    """Equals `rope_append` (the same backend) then the float64 attention over the cache it wrote: the rotated
    queries, keys, values, positions and lengths bit for bit, the output within the dtype's tolerance."""
    from vlcache.kernels.decode_attention import rope_append_attention
    from vlcache.kernels.fused_ops import rope_append

    hkv, hq, b = 2, 2 * group, len(caps)
    lengths = torch.tensor(lengths)
    qkv, cos, sin, seen = _step_inputs(b, hq, hkv, d, dtype)
    if ragged:
        _, _, (k, v), bounds, length = _ragged_inputs(caps, lengths.clone(), hkv, group, d, dtype, backend)
        positions = torch.full(k.shape[:3], -1, dtype=torch.long, device=DEVICE)
        kw = dict(bounds=bounds)
    else:
        _, k, v, length = _inputs(b, hkv, group, caps[0], d, dtype, lengths.clone(), backend=backend)
        positions = torch.full(k.shape[:3], -1, dtype=torch.long, device=DEVICE)
        bounds, kw = None, {}
    bufs = [t.clone() for t in (k, v, length, positions)]
    q_ref = rope_append(qkv, cos, sin, *bufs[:2], *bufs[2:], seen, hq, backend=backend, **kw)
    q, out = rope_append_attention(
        qkv, cos, sin, k, v, length, positions, seen, hq, backend=backend, splits=splits, max_cap=max(caps), **kw
    )
    assert torch.equal(q, q_ref) and torch.equal(length, bufs[2]) and torch.equal(positions, bufs[3])
    for got, want in zip((k, v), bufs[:2]):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # junk past the lengths stays junk
    new_len = torch.minimum(lengths + 1, torch.tensor(caps)[:, None])
    assert torch.equal(length.cpu(), new_len)
    k_ref, v_ref = (k, v) if bounds is None else (_unpack(k, bounds, caps), _unpack(v, bounds, caps))
    ref = reference(q, k_ref, v_ref, new_len, d**-0.5)
    assert out.shape == (b, hq, 1, d) and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    ("backend", "splits"), [("torch", None)] + [("triton", s) for s in (None, 1, 3) if "triton" in BACKENDS]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize(
    ("cap", "lengths"), [(37, [[0, 36], [37, 5], [20, 1]]), (203, [[202, 0], [117, 64], [3, 200]])]
)
def test_rope_append_attention_logits(backend, splits, dtype, group, cap, lengths):
    """`logits=`: each valid entry's logit (the new one included) times log2(e), and per split a log2-sum-exp2
    whose total is the row's, against float64; the attention itself unchanged (bit for bit)."""
    from vlcache.kernels.decode_attention import rope_append_attention

    hkv, hq, b, d = 2, 2 * group, 3, 32
    lengths = torch.tensor(lengths)
    qkv, cos, sin, seen = _step_inputs(b, hq, hkv, d, dtype)
    _, k, v, length = _inputs(b, hkv, group, cap, d, dtype, lengths.clone(), backend=backend)
    positions = torch.full(k.shape[:3], -1, dtype=torch.long, device=DEVICE)
    bufs = [t.clone() for t in (k, v, length, positions)]
    lg = torch.full((b * hkv + 1, group + 1, cap + 5), 7.0, device=DEVICE)  # larger than needed: strides
    lse = torch.full((b, hq, 64), 7.0, device=DEVICE)
    q, out = rope_append_attention(
        qkv, cos, sin, k, v, length, positions, seen, hq, backend=backend, splits=splits, logits=(lg, lse)
    )
    _, plain = rope_append_attention(qkv, cos, sin, *bufs[:3], bufs[3], seen, hq, backend=backend, splits=splits)
    assert torch.equal(out, plain)
    qd, kd = q.double().cpu(), k.double().cpu()
    for i in range(b):
        for h in range(hq):
            n = int(length[i, h // group])
            want = (kd[i, h // group, :n] @ qd[i, h, 0]) * d**-0.5 / torch.log(torch.tensor(2.0, dtype=torch.float64))
            got = lg[i * hkv + h // group, h % group, :n].double().cpu()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            total = torch.logsumexp(lse[i, h].double().cpu() * torch.log(torch.tensor(2.0)).double(), 0)
            want_lse = torch.logsumexp(want * torch.log(torch.tensor(2.0)).double(), 0)
            torch.testing.assert_close(total, want_lse, rtol=1e-5, atol=1e-5)
            if splits == 3:
                assert torch.isfinite(lse[i, h, :3]).any() and (lse[i, h, 3:] == float("-inf")).all()


def test_logits_need_the_padded_layout_and_room():
    from vlcache.kernels.decode_attention import _check_logits

    lg, lse = torch.zeros(4, 2, 10), torch.zeros(2, 4, 8)
    _check_logits((lg, lse), 2, 4, 2, 10, 8, False)
    with pytest.raises(ValueError, match="padded"):
        _check_logits((lg, lse), 2, 4, 2, 10, 8, True)
    with pytest.raises(ValueError, match="too small"):
        _check_logits((lg, lse), 2, 4, 2, 11, 8, False)
    with pytest.raises(ValueError, match="power of 2"):
        _check_logits((lg, torch.zeros(2, 4, 6)), 2, 4, 2, 10, 4, False)
