"""The small fused kernels of the fused decode step (vlcache/engine/fused_decode.py), one launch each.

A decoder layer of a Llama-family model, run as transformers runs it, launches about fifty kernels at one
token per sequence: RMSNorm alone is six (cast, pow, mean, add, rsqrt, two muls), RoPE a dozen. At batch 1
each lasts a few microseconds whatever its size, which puts a 7B model's decode step near twice its
memory-bandwidth floor even inside a CUDA graph. These kernels do the same arithmetic in one launch each:

* ``rms_norm(x, w, eps, residual=None)``: ``h = x + residual`` (rounded to the input dtype, as transformers'
  ``residual + hidden_states``), then RMSNorm (Zhang & Sennrich 2019, eq. 4: ``y = w · h / sqrt(mean(h²) + eps)``)
  in float32, with transformers' roundings (``w * y.to(dtype)``); returns ``(h, y)``.
* ``silu_mul(gu)``: SwiGLU's ``silu(gate) · up`` (Shazeer 2020, eq. 6) from the fused gate/up projection
  ``[B, 2I]``, rounded after the SiLU and after the product as ``act_fn(gate(x)) * up(x)`` is.
* ``rope_append(qkv, cos, sin, cache layer ...)``: rotary embedding (Su et al. 2021, eq. 34, the rotate-half
  form) of the query and key heads of the fused QKV projection, rounded term by term as transformers'
  ``q * cos + rotate_half(q) * sin``; the rotated key and the value are written at each (sequence, KV head)
  row's end of the compressed cache, with their original position, and the row's length is advanced (padded
  storage ``[B, Hkv, cap, D]``, or ragged ``[1, Hkv, T, D]`` with row starts ``bounds``, as
  ``CompressedLayer.reserve_ragged`` packs it).

Each has a PyTorch fallback with transformers' exact operations (CPU tensors, unless ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import runs_triton

__all__ = ["check_append", "rms_norm", "rope_append", "silu_mul"]


def _use_triton(x: torch.Tensor, backend: str | None) -> bool:
    if backend is None:
        return runs_triton(x)
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None; got {backend!r}")
    return backend == "triton"


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


# -- RMSNorm, with the residual add in front -------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, N, eps,
    s_x, s_r, s_h, s_y,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * s_r + cols, mask=ok, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * s_h + cols, h, mask=ok)
        x = h.to(tl.float32)
    var = tl.sum(x * x, 0) / N
    y = (x * tl.math.rsqrt(var + eps)).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * s_y + cols, (w * y).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm_torch(x, w, eps, residual=None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `residual + hidden_states` then `LlamaRMSNorm.forward`, op for op."""
    h = x if residual is None else x + residual
    y = h.to(torch.float32)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return h, w * y.to(h.dtype)


def rms_norm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *, backend=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, N]` rows: returns `(h, y)`, `h = x + residual` (or `x`), `y = RMSNorm(h) · w`."""
    if x.dim() != 2 or w.shape != (x.shape[1],) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm wants x [B, N], w [N], residual [B, N]; got {tuple(x.shape)}, {tuple(w.shape)}")
    if not _use_triton(x, backend):
        return rms_norm_torch(x, w, eps, residual)
    B, N = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x
    r = residual if residual is not None else x
    block = triton.next_power_of_2(N)
    _rms_norm_kernel[(B,)](
        x, r, w, h, y, N, float(eps), x.stride(0), r.stride(0), h.stride(0), y.stride(0),
        HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block),
    )
    return h, y


# -- SwiGLU ------------------------------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(gu_ptr, o_ptr, inter, s_g, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(gu_ptr + row * s_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_g + inter + cols, mask=ok, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)
    tl.store(o_ptr + row * s_o + cols, (a * u).to(o_ptr.dtype.element_ty), mask=ok)


def silu_mul(gu: torch.Tensor, *, backend=None) -> torch.Tensor:
    """`[B, 2I]` (gate, then up) -> `[B, I]` `silu(gate) · up`."""
    if gu.dim() != 2 or gu.shape[1] % 2:
        raise ValueError(f"silu_mul wants [B, 2I]; got {tuple(gu.shape)}")
    B, I2 = gu.shape
    inter = I2 // 2
    if not _use_triton(gu, backend):
        return F.silu(gu[:, :inter]) * gu[:, inter:]
    out = torch.empty(B, inter, dtype=gu.dtype, device=gu.device)
    block = min(2048, triton.next_power_of_2(inter))
    _silu_mul_kernel[(B, triton.cdiv(inter, block))](
        gu, out, inter, gu.stride(0), out.stride(0), BLOCK=block, num_warps=_warps(block)
    )
    return out


# -- RoPE on the query and key heads, and the cache append -----------------------------------------------------
@triton.jit
def rope_rounded(x, x_rot, c, s, ty: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` (Su et al. 2021, eq. 34) from float32 operands, each product and the sum
    rounded to `ty` as transformers' tensor ops round them (launch with ``enable_fp_fusion=False``: no fused
    multiply-add). `x_rot` is ``rotate_half(x)``; shared by the decode append, the fused decode attention
    (decode_attention.py) and the prefill's split (prefill_ops.py)."""
    return ((x * c).to(ty).to(tl.float32) + (x_rot * s).to(ty).to(tl.float32)).to(ty)


@triton.jit
def _rope_append_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, len_ptr, pos_ptr, seen_ptr, bounds_ptr,
    Hq, cap, s_qkv, s_cs, s_ss,
    s_qb, s_qh,
    s_kb, s_kh, s_kn,
    s_vb, s_vh, s_vn,
    s_lb, s_lh, s_pb, s_ph, s_pn,
    HALF: tl.constexpr, BLOCK: tl.constexpr, RAGGED: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    ok = d < HALF
    D = 2 * HALF
    row = qkv_ptr + b * s_qkv + j * D  # head j of [q heads | k heads | v heads]
    x1 = tl.load(row + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + d, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + b * s_cs + d, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + b * s_cs + HALF + d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + b * s_ss + d, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + b * s_ss + HALF + d, mask=ok, other=0.0).to(tl.float32)
    ty = q_ptr.dtype.element_ty
    o1, o2 = rope_rounded(x1, -x2, c1, s1, ty), rope_rounded(x2, x1, c2, s2, ty)
    if j < Hq:
        dst = q_ptr + b * s_qb + j * s_qh
        tl.store(dst + d, o1, mask=ok)
        tl.store(dst + HALF + d, o2, mask=ok)
    else:
        h = (j - Hq).to(tl.int64)
        n = tl.load(len_ptr + b * s_lb + h * s_lh)
        if RAGGED:  # sequence b's rows start at token slot bounds[b] of every head, with their own capacity
            row0 = tl.load(bounds_ptr + b)
            row_cap = tl.load(bounds_ptr + b + 1) - row0
            k_row = k_ptr + h * s_kh + row0 * s_kn
            v_row = v_ptr + h * s_vh + row0 * s_vn
            p_row = pos_ptr + h * s_ph + row0 * s_pn
        else:
            row_cap = cap
            k_row = k_ptr + b * s_kb + h * s_kh
            v_row = v_ptr + b * s_vb + h * s_vh
            p_row = pos_ptr + b * s_pb + h * s_ph
        # reserved buffers: a full row drops the entry rather than write out of bounds (or into the next row)
        room = ok & ((n + tl.zeros([BLOCK], tl.int64)) < row_cap)
        slot = tl.maximum(tl.minimum(n, row_cap - 1), 0)
        kdst = k_row + slot * s_kn
        tl.store(kdst + d, o1, mask=room)
        tl.store(kdst + HALF + d, o2, mask=room)
        Hkv = (tl.num_programs(1) - Hq).to(tl.int64)
        vrow = qkv_ptr + b * s_qkv + (Hq + Hkv + h) * D
        vdst = v_row + slot * s_vn
        tl.store(vdst + d, tl.load(vrow + d, mask=ok, other=0.0), mask=room)
        tl.store(vdst + HALF + d, tl.load(vrow + HALF + d, mask=ok, other=0.0), mask=room)
        if n < row_cap:
            tl.store(p_row + slot * s_pn, tl.load(seen_ptr) - 1)
            tl.store(len_ptr + b * s_lb + h * s_lh, n + 1)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_append_torch(qkv, cos, sin, keys, values, length, positions, seen, hq):
    """transformers' `apply_rotary_pos_emb` and `CompressedLayer.update`'s scatter, op for op."""
    B, hkv, cap, D = keys.shape
    heads = qkv.view(B, hq + 2 * hkv, D)
    c, s = cos[:, None], sin[:, None]
    q = _rotate(heads[:, :hq], c, s)
    k = _rotate(heads[:, hq : hq + hkv], c, s)
    v = heads[:, hq + hkv :]
    room = (length < cap)[..., None]  # [B, Hkv, 1]: a full row keeps its last entry as it is
    slot = length.clamp(max=cap - 1)[..., None]
    d_slot = slot[..., None].expand(-1, -1, 1, D)
    keys.scatter_(2, d_slot, torch.where(room[..., None], k[:, :, None], keys.gather(2, d_slot)))
    values.scatter_(2, d_slot, torch.where(room[..., None], v[:, :, None], values.gather(2, d_slot)))
    positions.scatter_(2, slot, torch.where(room, seen - 1, positions.gather(2, slot)))
    length.add_(room[..., 0].to(length.dtype))
    return q[:, :, None]


def rope_append_ragged_torch(qkv, cos, sin, keys, values, length, positions, seen, hq, bounds):
    """`rope_append_torch` on ragged storage (`keys` `[1, Hkv, T, D]`, row starts `bounds`): the same rotation,
    then the new entry written at slot `bounds[b] + length[b, h]` of each row with room (a full row, or one of
    capacity 0 whose start is the next row's, is left out, so no two writes meet)."""
    _, hkv, _, D = keys.shape
    B = bounds.shape[0] - 1
    heads = qkv.view(B, hq + 2 * hkv, D)
    c, s = cos[:, None], sin[:, None]
    q = _rotate(heads[:, :hq], c, s)
    k = _rotate(heads[:, hq : hq + hkv], c, s)
    v = heads[:, hq + hkv :]
    room = length < (bounds[1:] - bounds[:-1])[:, None]  # [B, Hkv]
    b, h = room.nonzero(as_tuple=True)
    slot = bounds[b] + length[b, h]
    keys[0, h, slot] = k[b, h]
    values[0, h, slot] = v[b, h]
    positions[0, h, slot] = seen - 1
    length.add_(room.to(length.dtype))
    return q[:, :, None]


def check_append(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    bounds: torch.Tensor | None = None,
) -> None:
    """Validates `rope_append`'s shapes (also those of `rope_append_attention`, which appends as it does)."""
    _, hkv, _, D = keys.shape
    B = qkv.shape[0]
    if (keys.shape[0] != (B if bounds is None else 1)) or (bounds is not None and bounds.shape != (B + 1,)):
        raise ValueError(
            f"rope_append: keys {tuple(keys.shape)} and bounds {None if bounds is None else tuple(bounds.shape)} "
            f"do not match a batch of {B} (padded: keys [B, Hkv, cap, D]; ragged: [1, Hkv, T, D], bounds [B + 1])"
        )
    if qkv.shape != (B, (num_heads + 2 * hkv) * D) or D % 2 or cos.shape != (B, D) or sin.shape != (B, D):
        raise ValueError(
            f"rope_append: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, keys {tuple(keys.shape)} do not match "
            f"{num_heads} query heads"
        )
    if keys.stride(-1) != 1 or values.stride(-1) != 1 or qkv.stride(-1) != 1:
        raise ValueError("rope_append needs a unit stride along the head dimension")


def rope_append(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: torch.Tensor,
    positions: torch.Tensor,
    seen: torch.Tensor,
    num_heads: int,
    *,
    backend=None,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token: rotates the query and key heads of `qkv` `[B, (Hq + 2·Hkv)·D]` by `cos`/`sin` `[B, D]`,
    writes the key and value of each (sequence, KV head) at entry `length[b, h]` of `keys`/`values`
    `[B, Hkv, cap, D]` (in place, no reallocation: CUDA-graph safe), sets `positions[b, h, slot] = seen - 1`
    (`seen`: a device scalar, the tokens seen with this one) and advances `length` `[B, Hkv]`. A row already at
    `cap` entries is left as it is.

    With `bounds` (`[B + 1]` int64 row starts, `CompressedLayer.reserve_ragged`), `keys`/`values` are
    `[1, Hkv, T, D]` and `positions` `[1, Hkv, T]`: row `(b, h)`'s entry `i` is token slot `bounds[b] + i` of
    head `h`, and its capacity is `bounds[b + 1] - bounds[b]`.

    Returns the rotated queries `[B, Hq, 1, D]`.
    """
    check_append(qkv, cos, sin, keys, values, num_heads, bounds)
    _, hkv, cap, D = keys.shape
    B = qkv.shape[0]
    if not _use_triton(qkv, backend):
        if bounds is not None:
            return rope_append_ragged_torch(qkv, cos, sin, keys, values, length, positions, seen, num_heads, bounds)
        return rope_append_torch(qkv, cos, sin, keys, values, length, positions, seen, num_heads)
    q = torch.empty(B, num_heads, 1, D, dtype=qkv.dtype, device=qkv.device)
    _rope_append_kernel[(B, num_heads + hkv)](
        qkv, cos, sin, q, keys, values, length, positions, seen, length if bounds is None else bounds,
        num_heads, cap, qkv.stride(0), cos.stride(0), sin.stride(0),
        q.stride(0), q.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        length.stride(0), length.stride(1), *positions.stride(),
        HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), RAGGED=bounds is not None, num_warps=1,
        enable_fp_fusion=False,  # no fused multiply-add: each product is rounded, as transformers' tensor ops do
    )
    return q
