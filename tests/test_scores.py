"""The scoring core (policies.md §4) against its float64 definition.

Backends checked: the PyTorch fallback (always), the Triton kernels under the interpreter
(when ``TRITON_INTERPRET=1`` is set; CPU CI runs this way) and natively on a GPU (when CUDA is
present). Every case draws fresh random inputs from its own seed.

Count tolerance: ``below`` compares each entry's log-probability gap to ``ln p``; the kernels
do it in float32 (log2 domain), the reference in float64 on probabilities. An entry whose gap
sits within float32 rounding of the threshold can legitimately land on either side, so counts
must match exactly except for at most the number of such near-threshold entries, which the
reference counts (|gap - ln p| < 1e-4, far above float32 rounding of logits of size ~10, far
below the spacing of random data, so it is almost always 0).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from vlcache.kernels import (
    AttentionScores,
    attention_scores,
    attention_scores_reference,
    attention_scores_torch,
)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()

# (backend, device) pairs that can run here.
BACKENDS = [pytest.param(("torch", "cpu"), id="torch-cpu")]
BACKENDS.append(
    pytest.param(
        ("triton", "cpu"),
        id="triton-interp",
        marks=pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 to run Triton on the CPU"),
    )
)
BACKENDS.append(
    pytest.param(
        ("triton", "cuda"), id="triton-cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
    )
)

NEAR_TOL = 1e-4


def _run(backend: tuple[str, str], q, k, q_pos, **kw) -> AttentionScores:
    name, device = backend
    out = attention_scores(
        q.to(device), k.to(device), q_pos.to(device),
        key_valid=None if kw.get("key_valid") is None else kw["key_valid"].to(device),
        scale=kw.get("scale"), threshold=kw.get("threshold"), backend=name,
    )
    return AttentionScores(
        col=out.col.cpu(),
        below=None if out.below is None else out.below.cpu(),
        visible=None if out.visible is None else out.visible.cpu(),
    )


def _near_threshold(q, k, q_pos, key_valid, threshold, scale=None) -> torch.Tensor:
    """``[B, Hq]``: visible entries whose log-gap to the row max is within NEAR_TOL of ln p."""
    B, Hq, Nq, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    lg = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(G, 1)) * scale
    j = torch.arange(k.shape[2])
    vis = (j.view(1, 1, -1) <= q_pos.view(B, Nq, 1)).unsqueeze(1)
    if key_valid is not None:
        vis = vis & key_valid.view(B, 1, 1, -1)
    lg = lg.masked_fill(~vis, float("-inf"))
    gap = lg - lg.amax(-1, keepdim=True)
    near = ((gap - math.log(threshold)).abs() < NEAR_TOL) & vis
    return near.sum(dim=(2, 3))


def _check(out: AttentionScores, ref: AttentionScores, near: torch.Tensor | None, rtol: float = 1e-4) -> None:
    assert out.col.dtype == torch.float32 and out.col.shape == ref.col.shape
    assert torch.isfinite(out.col).all(), "non-finite column sums"
    err = (out.col.double() - ref.col.double()).norm() / ref.col.double().norm().clamp_min(1e-30)
    assert err < rtol, f"col relative error {err:.3e}"
    if near is None:
        assert out.below is None and out.visible is None
        return
    assert out.below.dtype == torch.int64 and out.visible.dtype == torch.int64
    assert torch.equal(out.visible, ref.visible)
    diff = (out.below - ref.below).abs()
    assert (diff <= near).all(), f"below differs by {diff.max()} (near-threshold entries: {near.max()})"


def _inputs(gen, B, Hq, Hkv, Nq, Nk, D, dtype):
    q = torch.randn(B, Hq, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    return q, k


def _left_pad(gen, B, Nk, max_pad):
    pads = torch.randint(0, max_pad + 1, (B,), generator=gen)
    pads[0] = max_pad  # at least one sequence is padded
    kv = torch.arange(Nk).view(1, -1) >= pads.view(-1, 1)
    return kv, pads


# name: (seed, B, Hq, Hkv, Nq, Nk, D, dtype, rows, left_pad, threshold)
#   rows: "random" positions in [-1, Nk) | "causal" (Nq == Nk, arange) | "last" (window at the end)
CASES = {
    "odd-random-fp32-g4": (1, 2, 8, 2, 37, 101, 64, torch.float32, "random", 0, 0.05),
    "decode-bf16-g1-d80": (2, 3, 4, 4, 1, 101, 80, torch.bfloat16, "last", 17, 0.1),
    "causal-bf16-g7-d96": (3, 1, 7, 1, 67, 67, 96, torch.bfloat16, "causal", 0, 0.1),
    "window-leftpad-bf16-g4": (4, 3, 8, 2, 29, 83, 64, torch.bfloat16, "last", 30, 0.02),
    "gqa7-fp32-d80": (5, 2, 14, 2, 19, 53, 80, torch.float32, "random", 9, 0.3),
    "causal-leftpad-fp32-g1": (6, 2, 2, 2, 45, 45, 64, torch.float32, "causal", 12, None),
}


def _build(case):
    seed, B, Hq, Hkv, Nq, Nk, D, dtype, rows, pad, thr = case
    gen = torch.Generator().manual_seed(seed)
    q, k = _inputs(gen, B, Hq, Hkv, Nq, Nk, D, dtype)
    if rows == "random":
        q_pos = torch.randint(-1, Nk, (B, Nq), generator=gen)
    elif rows == "causal":
        q_pos = torch.arange(Nk).expand(B, Nq)  # stride 0 over the batch: kernels must use strides
    else:
        q_pos = torch.arange(Nk - Nq, Nk, dtype=torch.int32).expand(B, Nq).clone()
    kv = None
    if pad:
        kv, pads = _left_pad(gen, B, Nk, pad)
    return q, k, q_pos, kv, thr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(backend, case):
    q, k, q_pos, kv, thr = _build(CASES[case])
    ref = attention_scores_reference(q, k, q_pos, key_valid=kv, threshold=thr)
    out = _run(backend, q, k, q_pos, key_valid=kv, threshold=thr)
    near = None if thr is None else _near_threshold(q, k, q_pos, kv, thr)
    _check(out, ref, near)
    if kv is not None:  # padded keys get exactly nothing
        assert (out.col.permute(1, 0, 2)[:, ~kv] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_rows_and_explicit_scale(backend):
    """Rows with q_pos = -1 (ragged row sets) and rows that see only padded keys add nothing."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, Nq, Nk, D = 2, 6, 3, 23, 61, 64
    q, k = _inputs(gen, B, Hq, Hkv, Nq, Nk, D, torch.float32)
    q_pos = torch.arange(Nk - Nq, Nk).expand(B, Nq).clone()
    q_pos[1, -9:] = -1  # sequence 1 has 9 fewer rows
    kv = torch.ones(B, Nk, dtype=torch.bool)
    kv[0, :20] = False
    q_pos[0, 0] = 10  # sees keys 0..10, all padded: contributes nothing
    ref = attention_scores_reference(q, k, q_pos, key_valid=kv, threshold=0.07, scale=0.05)
    out = _run(backend, q, k, q_pos, key_valid=kv, threshold=0.07, scale=0.05)
    _check(out, ref, _near_threshold(q, k, q_pos, kv, 0.07, scale=0.05))
    # each row that sees something contributes exactly 1 per query head
    n_rows = torch.tensor([Nq - 1, Nq - 9], dtype=torch.float64)
    torch.testing.assert_close(out.col.double().sum(dim=(1, 2)), n_rows * Hq, rtol=1e-5, atol=0)
    # and removing the invisible rows changes nothing
    keep = q_pos[1] >= 0
    out1 = _run(backend, q[1:, :, keep], k[1:], q_pos[1:, keep], key_valid=kv[1:], threshold=0.07, scale=0.05)
    torch.testing.assert_close(out1.col, out.col[1:], rtol=1e-5, atol=1e-6)
    assert torch.equal(out1.below, out.below[1:]) and torch.equal(out1.visible, out.visible[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_not_absolute_threshold(backend):
    """A built case where ``prob < p`` and ``prob < p · rowmax`` disagree; ours is the relative one."""
    p = 0.1
    Nk, D = 64, 64
    gen = torch.Generator().manual_seed(21)
    x = torch.rand(Nk, generator=gen)
    # keep x away from the relative cut of row 1 (x < 1 - ln(10)/8 ~ 0.712) to avoid near-ties
    x = torch.where((x - (1 - math.log(10) / 8)).abs() < 0.01, x + 0.05, x)
    k = torch.zeros(1, 1, Nk, D)
    k[0, 0, :, 0] = x
    k[0, 0, :, 1:] = 0.01 * torch.randn(Nk, D - 1, generator=gen)
    q = torch.zeros(1, 1, 2, D)
    q[0, 0, 0, 0] = 1.0  # flat row: logits in [0, 1], max prob ~ e/64 < p, so all "absolutely" small
    q[0, 0, 1, 0] = 8.0  # peaked row: logits in [0, 8]
    q_pos = torch.full((1, 2), Nk - 1)
    ref = attention_scores_reference(q, k, q_pos, scale=1.0, threshold=p)
    probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()), dim=-1)
    absolute = int((probs < p).sum())
    relative = int((probs < p * probs.amax(-1, keepdim=True)).sum())
    assert absolute != relative
    assert int(ref.below.sum()) == relative
    out = _run(backend, q, k, q_pos, scale=1.0, threshold=p)
    assert int(out.below.sum()) == relative
    assert int(out.visible.sum()) == 2 * Nk


@pytest.mark.skipif(not INTERPRET and not HAS_CUDA, reason="needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("rows_stationary", [False, True], ids=["key-stationary", "row-stationary"])
def test_triton_both_pass2_kernels_with_key_splits(rows_stationary):
    """Force each pass-2 kernel, several key splits and tiny tiles so every merge path runs."""
    from vlcache.kernels.scores import _attention_scores_triton, _Config

    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator().manual_seed(31 + rows_stationary)
    B, Hq, Hkv, Nq, Nk, D = 2, 6, 2, 7, 97, 80  # G = 3: the one-hot head reduction pads to 4
    q, k = _inputs(gen, B, Hq, Hkv, Nq, Nk, D, torch.bfloat16)
    q_pos = torch.randint(-1, Nk, (B, Nq), generator=gen)
    kv, _ = _left_pad(gen, B, Nk, 25)
    ref = attention_scores_reference(q, k, q_pos, key_valid=kv, threshold=0.05)
    cfg = _Config(
        block_m1=16, block_n1=16, nsplit=4, block_m2=32 if rows_stationary else 16, block_n2=16,
        rows_stationary=rows_stationary, nsplit2=3,
    )
    out = _attention_scores_triton(
        q.to(device), k.to(device), q_pos.to(device), key_valid=kv.to(device), threshold=0.05, config=cfg
    )
    out = AttentionScores(out.col.cpu(), out.below.cpu(), out.visible.cpu())
    _check(out, ref, _near_threshold(q, k, q_pos, kv, 0.05))


def test_torch_fallback_chunks():
    """The fallback's row chunking must not change the result."""
    gen = torch.Generator().manual_seed(41)
    q, k = _inputs(gen, 2, 4, 2, 50, 70, 64, torch.float32)
    q_pos = torch.randint(-1, 70, (2, 50), generator=gen)
    a = attention_scores_torch(q, k, q_pos, threshold=0.1, max_chunk_rows=7)
    b = attention_scores_torch(q, k, q_pos, threshold=0.1, max_chunk_elems=1)  # one row per chunk
    ref = attention_scores_reference(q, k, q_pos, threshold=0.1)
    near = _near_threshold(q, k, q_pos, None, 0.1)
    _check(a, ref, near)
    _check(b, ref, near)


@pytest.mark.parametrize("chunk_elems", [1, 500, 1 << 20], ids=["row", "small", "default"])
def test_torch_fallback_partial_masks(chunk_elems):
    """Without a threshold the fallback masks only the key columns some row of a chunk cannot see and skips
    the keys no row reaches: left padding, a hole in the keys, a sequence with no valid key, rows before
    their sequence's first valid key and rows past the last key must still match the definition."""
    gen = torch.Generator().manual_seed(43)
    B, Hq, Hkv, Nq, Nk, D = 4, 6, 2, 40, 64, 32
    q, k = _inputs(gen, B, Hq, Hkv, Nq, Nk, D, torch.float32)
    kv = torch.arange(Nk).view(1, -1) >= torch.tensor([0, 5, 13, 0]).view(-1, 1)  # left padding
    kv[0, 30:33] = False  # a hole
    kv[3] = False  # nothing valid
    q_pos = torch.arange(Nk - Nq, Nk).expand(B, Nq).clone()
    q_pos[1, :6] = -1  # ragged row set
    q_pos[2, :3] = torch.tensor([2, 7, 12])  # before the first valid key (13): sees nothing
    q_pos[0, -2:] = Nk + 5  # past the last key: sees every valid key
    q_pos[3, -1] = Nk + 2  # ... but none in a sequence without valid keys
    ref = attention_scores_reference(q, k, q_pos, key_valid=kv)
    out = attention_scores_torch(q, k, q_pos, key_valid=kv, max_chunk_elems=chunk_elems)
    _check(out, ref, None)
    assert (out.col.permute(1, 0, 2)[:, ~kv] == 0).all()
    # the full-mask path (taken with a threshold) agrees
    full = attention_scores_torch(q, k, q_pos, key_valid=kv, threshold=0.1, max_chunk_elems=chunk_elems)
    torch.testing.assert_close(out.col, full.col, rtol=1e-5, atol=1e-6)
    causal = torch.arange(Nq).expand(B, Nq)  # causal rows over a prefix of the keys, nothing padded
    ref = attention_scores_reference(q, k, causal)
    _check(attention_scores_torch(q, k, causal, max_chunk_elems=chunk_elems), ref, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    q = torch.randn(1, 2, 0, 64)
    k = torch.randn(1, 2, 5, 64)
    out = _run(backend, q, k, torch.zeros(1, 0, dtype=torch.long), threshold=0.1)
    assert torch.equal(out.col, torch.zeros(1, 2, 5))
    assert torch.equal(out.below, torch.zeros(1, 2, dtype=torch.long))


def test_dispatch_and_validation():
    q = torch.randn(1, 4, 3, 64)
    k = torch.randn(1, 2, 9, 64)
    pos = torch.tensor([[6, 7, 8]])
    out = attention_scores(q, k, pos, backend="torch")
    assert out.below is None and out.visible is None and out.col.shape == (1, 2, 9)
    with pytest.raises(ValueError):
        attention_scores(q, k, pos, backend="numpy")
    with pytest.raises(ValueError):
        attention_scores(q, torch.randn(1, 3, 9, 64), pos, backend="torch")  # 4 % 3 != 0
    with pytest.raises(ValueError):
        attention_scores(q, k, pos, threshold=1.5, backend="torch")
    with pytest.raises(ValueError):
        attention_scores(q, k, pos.float(), backend="torch")


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize(
    "B,Nq,Nk,rows,pad,thr",
    [
        (1, 50, 8192, "last", 0, 0.01),  # VL-Cache post-vision rows
        (1, 1024, 1024, "causal", 0, 0.05),  # all prompt rows (H2O)
        (16, 32, 2048, "last", 300, None),  # SnapKV window, batched with left padding
        (2, 1, 4099, "last", 100, 0.1),  # decode row, odd length
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_llava_shapes(B, Nq, Nk, rows, pad, thr, dtype):
    """LLaVA-1.6-Mistral-7B head shapes (Hq 32, Hkv 8, D 128), native dots on the GPU."""
    dtype_id = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}[dtype]
    gen = torch.Generator().manual_seed(B * 1_000_003 + Nq * 1009 + Nk * 7 + dtype_id)
    Hq, Hkv, D = 32, 8, 128
    q, k = _inputs(gen, B, Hq, Hkv, Nq, Nk, D, dtype)
    q_pos = (torch.arange(Nk) if rows == "causal" else torch.arange(Nk - Nq, Nk)).expand(B, Nq).clone()
    kv = _left_pad(gen, B, Nk, pad)[0] if pad else None
    dq, dk, dp = q.cuda(), k.cuda(), q_pos.cuda()
    dkv = None if kv is None else kv.cuda()
    ref = attention_scores_reference(dq, dk, dp, key_valid=dkv, threshold=thr)
    ref = AttentionScores(ref.col.cpu(), *(None if t is None else t.cpu() for t in (ref.below, ref.visible)))
    out = attention_scores(dq, dk, dp, key_valid=dkv, threshold=thr)
    assert out.col.is_cuda
    out = AttentionScores(out.col.cpu(), *(None if t is None else t.cpu() for t in (out.below, out.visible)))
    near = None if thr is None else _near_threshold(q, k, q_pos, kv, thr)
    _check(out, ref, near, rtol=1e-4)
