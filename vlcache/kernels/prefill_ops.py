"""The prefill's RoPE in one pass: the fused prefill's (vlcache/engine/fused_prefill.py) split of the fused QKV
projection into rotated query and key heads and value heads.

transformers' attention module takes the three projections, views them as heads, and runs
``apply_rotary_pos_emb``: ``q * cos``, ``rotate_half(q)`` (two slices, a negation and a ``cat``), ``* sin`` and
the sum, for the queries and again for the keys, each a full pass over the tensor, about eight per layer in
all. At 32K-128K prompt tokens these elementwise passes are a visible part of prefill
(results/bench/profile_prefill_4x32768.txt). ``rope_split`` reads the fused projection once and writes the
three head-major tensors the attention wants:

* ``rope_split(qkv [T, (Hq + 2·Hkv)·D], cos [T, D], sin [T, D], batch, num_heads, num_kv_heads)`` →
  ``(q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, D])``, contiguous, ``T = B·L`` tokens in batch-major
  order. Query and key heads get the rotate-half RoPE (Su et al. 2021, eq. 34) rounded term by term as
  transformers' ``q * cos + rotate_half(q) * sin`` is (each product rounded to the dtype, then the sum; no fused
  multiply-add), the value heads are copied.

A Triton kernel on CUDA and for CPU tensors under ``TRITON_INTERPRET=1``; transformers' own operations otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlcache.kernels.fused_ops import _rotate, _use_triton, rope_rounded
from vlcache.kernels.launch import on_device

__all__ = ["rope_split", "rope_split_torch"]


@triton.jit
def _rope_split_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    L, Hq, Hkv, s_qkv, s_cs, s_ss,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # head j of [q heads | k heads | v heads] on axis 0: the programs that run together share a token block,
    # so its cosines and sines, read by every rotated head, stay in L2
    j = tl.program_id(0).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # positions within sequence b
    d = tl.arange(0, BLOCK_D)
    m = (pos < L)[:, None] & (d < HALF)[None, :]
    D = 2 * HALF
    tok = (b * L + pos).to(tl.int64)[:, None]
    src = qkv_ptr + tok * s_qkv + j * D + d[None, :]
    x1 = tl.load(src, mask=m, other=0.0)
    x2 = tl.load(src + HALF, mask=m, other=0.0)
    if j < Hq + Hkv:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        c1 = tl.load(cos_ptr + tok * s_cs + d[None, :], mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + tok * s_cs + HALF + d[None, :], mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tok * s_ss + d[None, :], mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + tok * s_ss + HALF + d[None, :], mask=m, other=0.0).to(tl.float32)
        ty = x1.dtype
        o1, o2 = rope_rounded(f1, -f2, c1, s1, ty), rope_rounded(f2, f1, c2, s2, ty)
    else:
        o1, o2 = x1, x2
    if j < Hq:
        dst = q_ptr + ((b * Hq + j) * L) * D
    elif j < Hq + Hkv:
        dst = k_ptr + ((b * Hkv + (j - Hq)) * L) * D
    else:
        dst = v_ptr + ((b * Hkv + (j - Hq - Hkv)) * L) * D
    dst = dst + pos.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(dst, o1, mask=m)
    tl.store(dst + HALF, o2, mask=m)


def rope_split_torch(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: int, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' `view(...).transpose(1, 2)` of each projection and `apply_rotary_pos_emb`, op for op (then
    made contiguous, as the kernel writes them)."""
    T = qkv.shape[0]
    L = T // batch
    heads = qkv.view(batch, L, num_heads + 2 * num_kv_heads, -1).transpose(1, 2)  # [B, H, L, D]
    c, s = cos.view(batch, 1, L, -1), sin.view(batch, 1, L, -1)
    q = _rotate(heads[:, :num_heads], c, s)
    k = _rotate(heads[:, num_heads : num_heads + num_kv_heads], c, s)
    v = heads[:, num_heads + num_kv_heads :]
    return q.contiguous(), k.contiguous(), v.contiguous()


def rope_split(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    batch: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits the fused QKV projection `qkv` `[T, (Hq + 2·Hkv)·D]` of `T = batch·L` tokens (batch-major) into
    contiguous `q` `[B, Hq, L, D]`, `k` `[B, Hkv, L, D]` (both rotated by `cos`/`sin` `[T, D]`, as
    `apply_rotary_pos_emb` rounds) and `v` `[B, Hkv, L, D]` (copied). `backend`: "triton", "torch" or None
    (Triton on CUDA and under `TRITON_INTERPRET=1`)."""
    if qkv.dim() != 2 or batch < 1 or qkv.shape[0] % batch:
        raise ValueError(f"rope_split wants qkv [B·L, (Hq + 2·Hkv)·D] for a batch of {batch}; got {tuple(qkv.shape)}")
    T, width = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    D = width // heads
    if width != heads * D or D % 2 or cos.shape != (T, D) or sin.shape != (T, D):
        raise ValueError(
            f"rope_split: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} do not match "
            f"{num_heads} query and {num_kv_heads} KV heads of an even head dimension"
        )
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("rope_split needs a unit stride along the feature dimension")
    if not _use_triton(qkv, backend):
        return rope_split_torch(qkv, cos, sin, batch, num_heads, num_kv_heads)
    L = T // batch
    q = torch.empty(batch, num_heads, L, D, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(batch, num_kv_heads, L, D, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty_like(k)
    block_d = triton.next_power_of_2(D // 2)
    block_t = max(1, min(2048 // block_d, triton.next_power_of_2(L)))  # about 2K elements per half-tile
    with on_device(qkv):  # Triton launches on the current device: the tensor's own GPU
        _rope_split_kernel[(heads, triton.cdiv(L, block_t), batch)](
            qkv, cos, sin, q, k, v, L, num_heads, num_kv_heads, qkv.stride(0), cos.stride(0), sin.stride(0),
            HALF=D // 2, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
            enable_fp_fusion=False,  # no fused multiply-add: each product rounded, as transformers' tensor ops do
        )
    return q, k, v
