"""Decode attention over the ragged compressed cache: one query token per sequence, flash-decoding style.

Each cache layer stores ``k``/``v`` as ``[B, Hkv, capacity, D]`` with the first ``length[b, h]`` entries of
each row valid (layers, KV heads and sequences keep different numbers). One decode step attends query head
``hq`` of sequence ``b`` over the valid entries of KV head ``hq // G`` (GQA, ``G = Hq / Hkv``).

Two launches:

1. ``_split_kernel``: grid ``(B·Hkv, NSPLIT)``. A program takes the ``G`` query heads of one KV head (stacked
   on the M axis of ``tl.dot``, padded to 16, so each key tile read serves the whole group) and one of the
   ``NSPLIT`` contiguous chunks of that row's *own* valid entries: the chunk size is computed in the kernel
   from ``length[b, h]``, so ragged rows all spread over every split and the grid stays fixed while the
   lengths grow (what a CUDA graph needs). Online softmax in float32, logits in the log2 domain (``exp2``).
   It writes each split's normalised partial output and log-sum-exp (or, with one split, the final output).
2. ``_combine_kernel``: grid ``(B·Hq, D / 32)`` merges the splits' partials with their log-sum-exp weights, a
   row's head dimension over four one-warp programs (one 4-warp program per row took the attention from 20.6 to
   22.8 µs per layer at batch 1, 128K prompt, budget 0.1 on an H200: experiments/combine_sweep.py). (Merging in
   the split kernel instead, by the row's last split to finish after a per-row counter, was slower on an H200:
   35 against 28 µs per layer at batch 4, 32K prompt, budget 0.1; not kept.)

   Also tried and not kept, a *balanced* split: all rows' valid entries laid end to end (in whole key tiles of each
   row) and shared equally among ``waves × SMs`` programs, each attending whatever row pieces its share crosses
   and writing one partial per piece (slot ``program + row``), merged per row by a combine that finds its row's
   programs from the rows' running ends. It removes the idle splits and the uneven programs per SM of the grid
   above, but on an H200 (decode_kernel_sweep's layers, same run as this kernel) it was slower everywhere:
   at batch 4, 32K prompt, budget 0.1 the split launch 17.8 → 22.6 µs and the combine 2.8 → 6.2 µs per layer
   (torch profiler), 21.8 → 25.1 µs for both at its best configuration; with the full cache 139 → 162 µs
   (batch 4, 32K) and 140 → 173 µs (batch 1, 128K), where each program's share (about 2,000 keys of one row)
   matches this grid's chunks. The key loop was software-pipelined in both (same async copies in the TTGIR), and
   launching in this grid's order changed nothing; the likely cause is occupancy: the split kernel compiled to
   150-186 registers per thread against this one's 90 (2-3 resident programs per SM instead of 5), from the rows'
   running ends and the loop over row pieces. A draft with its first piece straight-line and a merge without the
   per-slot emptiness test reached 146 against 137 µs at (1, 128K) full, still slower.

``rope_append_attention`` (the fused decode step's) first does ``rope_append``'s work in the split kernel: RoPE on
the group's queries and the new key from the fused q/k/v projection, the new entry written by split 0, which also
takes it into its softmax from registers; the length advances once every split has read it.

With ``logits`` (padded layout) the split kernel also stores each valid entry's float32 logit (log2 domain) and
each split's log2-sum-exp2 into the caller's buffers: H2O's decode rule reads its attention row from there instead of
reading the keys again (rule_ops.h2o_step_).

Ragged storage (``bounds``, from ``CompressedLayer.reserve_ragged``): ``k``/``v`` are ``[1, Hkv, T, D]`` with the
rows of sequence ``b`` at token slots ``[bounds[b], bounds[b + 1])`` of each KV head, so each sequence holds its
own capacity rather than the batch's longest row; the ``RAGGED`` form of ``_split_kernel`` offsets by
``bounds[b]`` instead of ``b``'s batch stride and clamps each row to its own capacity.

The bytes read are the valid keys and values once (spare capacity is never touched): the floor of a decode
step's attention is ``2 · Σ length · D · itemsize`` over the memory bandwidth.

``decode_attention`` picks the Triton path for CUDA tensors (and for CPU tensors under
``TRITON_INTERPRET=1``, where bf16 tiles are upcast to float32 before ``tl.dot``), else a PyTorch fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fused_ops import check_append, rope_append, rope_rounded
from .launch import interpreting, runs_triton, sm_count

__all__ = ["DecodeConfig", "decode_attention", "decode_attention_torch", "num_splits", "rope_append_attention"]

_LOG2E = 1.4426950408889634
# the merge's launch: a (sequence, query head) row's head dimension over D / COMBINE_BLOCK_D programs, so more of
# the partials' loads are in flight (experiments/combine_sweep.py)
COMBINE_BLOCK_D = 32
COMBINE_WARPS = 1


@dataclass
class DecodeConfig:
    """Launch parameters. ``waves``: aim for ``waves × SMs`` programs; a split gets at least
    ``min_keys_per_split`` keys (of the capacity) and there are at most ``max_splits`` splits. Where the
    (sequence, KV head) rows alone fill ``row_waves × SMs`` programs, one split: the combine launch then costs
    more than the extra parallelism buys (batch 64, 2K prompt, budget 0.1 on an H200: 17.9 against 22.5 µs per
    layer, results/bench/decode_kernel_sweep_h200.json)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    waves: int = 4
    min_keys_per_split: int = 128
    max_splits: int = 64
    row_waves: float = 2.0


DEFAULT_CONFIG = DecodeConfig()


@triton.jit
def _rope_tile(row_ptr, heads, ok, cos_ptr, sin_ptr, d, D, ROTATE: tl.constexpr):
    """Heads `heads` (`[R]`) of one token's fused q/k/v projection row as an `[R, BLOCK_D]` tile; `ROTATE`: with
    RoPE, rounded as transformers rounds it (`fused_ops.rope_rounded`)."""
    x = tl.load(row_ptr + heads[:, None] * D + d[None, :], mask=ok, other=0.0)
    if ROTATE:
        ty = x.dtype
        half = D // 2
        d_ok = d < D
        lower = d < half
        xp = tl.load(row_ptr + heads[:, None] * D + tl.where(lower, d + half, d - half)[None, :], mask=ok, other=0.0)
        xp = tl.where(lower[None, :], -xp.to(tl.float32), xp.to(tl.float32))  # rotate_half
        c = tl.load(cos_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        x = rope_rounded(x.to(tl.float32), xp, c[None, :], s[None, :], ty)
    return x


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, bounds_ptr, o_ptr, lse_ptr,
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, seen_ptr, lg_ptr,
    Hkv, G, cap, D, NSPLIT, qk_scale,
    s_qb, s_qh, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_lb, s_lh,
    s_ob, s_oh, s_os, s_od,
    s_eb, s_eh,
    s_qkv, s_cs, s_ss, s_pb, s_ph, s_pn, s_lgr, s_lgg,
    FINAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, RAGGED: tl.constexpr, APPEND: tl.constexpr,
    LOGITS: tl.constexpr, LSE_SLOTS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)  # int64: batch offsets of large caches overflow int32
    h = (pid_bh % Hkv).to(tl.int64)

    n_raw = tl.load(len_ptr + b * s_lb + h * s_lh)
    n = n_raw.to(tl.int32)
    if RAGGED:  # sequence b's rows start at token slot bounds[b] of every head, with their own capacity
        row0 = tl.load(bounds_ptr + b)
        row_cap = tl.load(bounds_ptr + b + 1) - row0
        k_base = k_ptr + h * s_kh + row0 * s_kn
        v_base = v_ptr + h * s_vh + row0 * s_vn
        p_base = pos_ptr + h * s_ph + row0 * s_pn
        n = tl.minimum(tl.maximum(n, 0), row_cap.to(tl.int32))
    else:
        row_cap = cap
        k_base = k_ptr + b * s_kb + h * s_kh
        v_base = v_ptr + b * s_vb + h * s_vh
        p_base = pos_ptr + b * s_pb + h * s_ph
        n = tl.minimum(tl.maximum(n, 0), cap)
    # this row's valid entries, cut into NSPLIT chunks of whole key blocks
    per = tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_N) * BLOCK_N
    lo = pid_s * per
    hi = tl.minimum(lo + per, n)

    gi = tl.arange(0, BLOCK_G)
    g_ok = gi < G
    heads = h * G + gi
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    gd_ok = g_ok[:, None] & d_ok[None, :]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    lg_row = lg_ptr + (b * Hkv + h) * s_lgr + gi[:, None] * s_lgg  # LOGITS: [G, cap] of this (sequence, KV head)
    if APPEND:  # rope_append's work, then the new entry enters split 0's softmax from registers
        row = qkv_ptr + b * s_qkv
        cs, ss = cos_ptr + b * s_cs, sin_ptr + b * s_ss
        Hq = Hkv * G
        q = _rope_tile(row, heads, gd_ok, cs, ss, d, D, True)
        kn = _rope_tile(row, Hq + h + gi * 0, gd_ok, cs, ss, d, D, True)  # the new key on every row of the tile
        vn = _rope_tile(row, Hq + Hkv + h + gi * 0, gd_ok, cs, ss, d, D, False)
        # [BLOCK_G] blocks rather than scalars: the interpreter cannot AND a scalar condition into a block mask
        zero = gi * 0
        first = (zero + pid_s) == 0
        tl.store(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd, q, mask=gd_ok & first[:, None])
        # a full row drops the entry, as rope_append does (no write out of bounds or into the next row)
        room = ((zero + n_raw) < row_cap) & first
        slot = tl.maximum(tl.minimum(n_raw, row_cap - 1), 0)
        one = (gi == 0) & room
        tl.store(k_base + slot * s_kn + zero[:, None] + d[None, :] * s_kd, kn, mask=one[:, None] & d_ok[None, :])
        tl.store(v_base + slot * s_vn + zero[:, None] + d[None, :] * s_vd, vn, mask=one[:, None] & d_ok[None, :])
        tl.store(p_base + slot * s_pn + zero, tl.load(seen_ptr) - 1 + zero, mask=one)
        if FINAL:  # the only program of this row; with splits the others read the length, so _combine_kernel does
            tl.store(len_ptr + b * s_lb + h * s_lh + zero, n_raw + 1 + zero, mask=one)
        s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale
        if LOGITS:
            tl.store(lg_row + slot + zero[:, None], s_new[:, None], mask=(g_ok & room)[:, None])
        m_i = tl.where(room, s_new, m_i)
        l_i = tl.where(room, 1.0, l_i)
        acc = tl.where(room[:, None], vn.to(tl.float32), acc)
    else:
        q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd, mask=gd_ok, other=0.0)
    if UPCAST:  # interpreter: bf16 tl.dot is wrong there, fp32 is exact
        q = q.to(tl.float32)

    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = cols < hi
        kt = tl.load(k_base + cols[None, :] * s_kn + d[:, None] * s_kd, mask=ok[None, :] & d_ok[:, None],
                     other=0.0)
        vt = tl.load(v_base + cols[:, None] * s_vn + d[None, :] * s_vd, mask=ok[:, None] & d_ok[None, :],
                     other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        if IEEE:  # fp32 inputs: no tf32 rounding
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
        if LOGITS:
            tl.store(lg_row + cols[None, :], s, mask=g_ok[:, None] & ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block holds at least one valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0.0  # an empty split (or an empty row) contributes nothing
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    o_off = b * s_ob + heads[:, None] * s_oh + d[None, :] * s_od
    if FINAL:
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        tl.store(o_ptr + o_off + pid_s * s_os, out, mask=g_ok[:, None] & d_ok[None, :])
    if LOGITS or not FINAL:
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * s_eb + heads * s_eh + pid_s, lse, mask=g_ok)
    if LOGITS:  # split 0 marks the unused slots empty, so a reader can take all LSE_SLOTS
        sl = tl.arange(0, LSE_SLOTS)
        empty = (sl[None, :] >= NSPLIT) & g_ok[:, None] & ((sl * 0 + pid_s) == 0)[None, :]
        tl.store(lse_ptr + b * s_eb + heads[:, None] * s_eh + sl[None, :],
                 tl.full([BLOCK_G, LSE_SLOTS], float("-inf"), tl.float32), mask=empty)


@triton.jit
def _combine_kernel(
    o_ptr, lse_ptr, out_ptr, len_ptr, bounds_ptr,
    Hq, G, cap, NSPLIT, D,
    s_ob, s_oh, s_os,
    s_eb, s_eh,
    s_xb, s_xh, s_xd,
    s_lb, s_lh,
    APPEND: tl.constexpr, RAGGED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // Hq).to(tl.int64)
    h = (pid % Hq).to(tl.int64)
    if APPEND:  # the split programs have all read the old length: the first query head of each group advances it
        if RAGGED:
            row_cap = tl.load(bounds_ptr + b + 1) - tl.load(bounds_ptr + b)
        else:
            row_cap = cap
        n = tl.load(len_ptr + b * s_lb + (h // G) * s_lh)
        first = (h % G == 0) & (tl.program_id(1) == 0)
        tl.store(len_ptr + b * s_lb + (h // G) * s_lh, n + 1, mask=first & (n < row_cap))
    sp = tl.arange(0, BLOCK_S)
    s_ok = sp < NSPLIT
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    lse = tl.load(lse_ptr + b * s_eb + h * s_eh + sp, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)  # empty splits: exp2(-inf) = 0
    total = tl.sum(w, 0)
    o = tl.load(
        o_ptr + b * s_ob + h * s_oh + sp[:, None] * s_os + d[None, :],
        mask=s_ok[:, None] & d_ok[None, :], other=0.0,
    )
    res = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * s_xb + h * s_xh + d * s_xd, res.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: torch.Tensor,
    bounds: torch.Tensor | None = None,
    max_cap: int | None = None,
) -> tuple[int, ...]:
    """Validates the shapes; returns ``(B, Hq, Hkv, cap, D)``, ``cap`` the largest row capacity (ragged: from
    ``max_cap``, else read from ``bounds``, a host sync)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, Hq, 1, D]; got {tuple(q.shape)}")
    want = "[B, Hkv, cap, D]" if bounds is None else "[1, Hkv, T, D] (ragged)"
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be {want}; got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    _, Hkv, cap, Dk = k.shape
    if k.shape[0] != (B if bounds is None else 1) or Dk != D or Hq % Hkv:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)} (k must be {want})")
    if tuple(length.shape) != (B, Hkv):
        raise ValueError(f"length must be [B, Hkv] = [{B}, {Hkv}]; got {tuple(length.shape)}")
    if bounds is not None:
        if tuple(bounds.shape) != (B + 1,) or bounds.dtype != torch.long:
            raise ValueError(f"bounds must be int64 [B + 1] = [{B + 1}]; got {bounds.dtype} {tuple(bounds.shape)}")
        cap = int((bounds[1:] - bounds[:-1]).max()) if max_cap is None else int(max_cap)
    return B, Hq, Hkv, cap, D


def num_splits(
    B: int, Hkv: int, cap: int, device: torch.device, config: DecodeConfig = DEFAULT_CONFIG
) -> int:
    """Splits of the key axis per (sequence, KV head): enough programs to fill the GPU a few times over,
    chunks of at least ``min_keys_per_split`` keys. Depends on the capacity only, not on the lengths, so a
    captured graph stays valid as the cache fills."""
    if B * Hkv >= config.row_waves * sm_count(device):
        return 1
    want = triton.cdiv(config.waves * sm_count(device), B * Hkv)
    most = max(1, cap // config.min_keys_per_split)
    return max(1, min(want, most, config.max_splits))


def _check_logits(logits, B: int, Hq: int, Hkv: int, cap: int, nsplit: int, ragged: bool) -> None:
    lg, lse = logits
    G = Hq // Hkv
    if ragged:
        raise ValueError("logits: the padded layout only (bounds=None)")
    if (lg.dtype, lse.dtype) != (torch.float32, torch.float32) or lg.dim() != 3 or lse.dim() != 3:
        raise ValueError(f"logits must be float32 [B·Hkv, G, cap] and [B, Hq, slots]; got {lg.dtype} "
                         f"{tuple(lg.shape)}, {lse.dtype} {tuple(lse.shape)}")  # fmt: skip
    if lg.shape[0] < B * Hkv or lg.shape[1] < G or lg.shape[2] < cap or lg.stride(2) != 1:
        raise ValueError(f"logits buffer {tuple(lg.shape)} is too small for {B * Hkv} rows, group {G}, cap {cap}")
    slots = lse.shape[2]
    if lse.shape[0] < B or lse.shape[1] < Hq or lse.stride(2) != 1 or slots < nsplit or slots & (slots - 1):
        raise ValueError(f"lse buffer {tuple(lse.shape)}: want [>= {B}, >= {Hq}, a power of 2 >= {nsplit} splits]")


def _decode_attention_triton(
    q, k, v, length, scale, splits=None, config: DecodeConfig = DEFAULT_CONFIG, bounds=None, max_cap=None, append=None,
    logits=None,
):  # fmt: skip
    """The Triton path. `append` (`(qkv, cos, sin, positions, seen)`): `q` is the output for the rotated
    queries, and the kernel first does `rope_append`'s work (`rope_append_attention`). `logits` (`(lg, lse)`): the
    kernel also writes every valid entry's logit (`rope_append_attention` says how)."""
    B, Hq, Hkv, cap, D = _check(q, k, v, length, bounds, max_cap)
    G = Hq // Hkv
    dev = q.device
    interp = dev.type != "cuda"
    if interp and not interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=dev)
    if B == 0:
        return out
    if cap == 0 and append is None:
        return out.zero_()
    nsplit = splits or num_splits(B, Hkv, cap, dev, config)
    block_g = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(D))
    final = nsplit == 1
    if final:
        o, lse = out, out  # lse never touched
        s_o = (out.stride(0), out.stride(1), 0, out.stride(3))
        s_e = (0, 0)
    else:
        o = torch.empty(B, Hq, nsplit, D, dtype=torch.float32, device=dev)
        lse = torch.empty(B, Hq, nsplit, dtype=torch.float32, device=dev)
        s_o = o.stride()
        s_e = lse.stride()[:2]
    lg, lse_slots = q, 1  # never read without logits
    s_lg = (0, 0)
    if logits is not None:
        _check_logits(logits, B, Hq, Hkv, cap, nsplit, bounds is not None)
        lg, lse = logits
        s_lg, s_e, lse_slots = (lg.stride(0), lg.stride(1)), lse.stride()[:2], lse.shape[2]
    if append is None:
        qkv, cos, sin, positions, seen = q, q, q, length, length  # never read
        s_app = (0,) * 6
    else:
        qkv, cos, sin, positions, seen = append
        s_app = (qkv.stride(0), cos.stride(0), sin.stride(0), *positions.stride())
    ragged = bounds is not None
    _split_kernel[(B * Hkv, nsplit)](
        q, k, v, length, bounds if ragged else length, o, lse,
        qkv, cos, sin, positions, seen, lg,
        Hkv, G, cap, D, nsplit, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(), *v.stride(),
        length.stride(0), length.stride(1),
        *s_o, *s_e, *s_app, *s_lg,
        FINAL=final, UPCAST=interp, IEEE=interp or q.dtype == torch.float32, RAGGED=ragged,
        APPEND=append is not None, LOGITS=logits is not None, LSE_SLOTS=lse_slots,
        BLOCK_G=block_g, BLOCK_N=config.block_n, BLOCK_D=block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
        # RoPE: no fused multiply-add, each product rounded as transformers' tensor ops round it (with fusion on,
        # bf16 queries came out one unit in the last place off rope_append's on an H200)
        enable_fp_fusion=append is None,
    )  # fmt: skip
    if not final:
        comb_d = min(block_d, COMBINE_BLOCK_D)  # a row's head dimension over several programs: more loads in flight
        _combine_kernel[(B * Hq, triton.cdiv(D, comb_d))](
            o, lse, out, length, bounds if ragged else length,
            Hq, G, cap, nsplit, D,
            o.stride(0), o.stride(1), o.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), out.stride(3),
            length.stride(0), length.stride(1),
            APPEND=append is not None, RAGGED=ragged,
            BLOCK_S=max(2, triton.next_power_of_2(nsplit)), BLOCK_D=comb_d, num_warps=COMBINE_WARPS,
        )  # fmt: skip
    return out


def decode_attention_torch(q, k, v, length, scale, bounds=None, max_cap=None) -> torch.Tensor:
    """The PyTorch fallback: SDPA over the whole capacity with a per-row length mask (rows of length 0: 0).
    Ragged storage (``bounds``) is first gathered into the padded ``[B, Hkv, cap, D]`` form."""
    B, Hq, Hkv, cap, D = _check(q, k, v, length, bounds, max_cap)
    if bounds is not None:
        if cap == 0 or k.shape[2] == 0:
            return torch.zeros_like(q)
        row_cap = bounds[1:] - bounds[:-1]  # [B]
        j = torch.arange(cap, device=k.device)
        # slot j of sequence b, clamped into its own row (the slots past its capacity are masked by length)
        src = (bounds[:-1, None] + torch.minimum(j, (row_cap[:, None] - 1).clamp(min=0))).clamp(max=k.shape[2] - 1)
        k, v = k[0][:, src].transpose(0, 1), v[0][:, src].transpose(0, 1)  # [B, Hkv, cap, D]
        length = torch.minimum(length, row_cap[:, None])
    group = Hq // Hkv
    valid = torch.arange(cap, device=k.device) < length[..., None]  # [B, Hkv, cap]
    mask = valid.repeat_interleave(group, dim=1)[:, :, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    nonempty = (length > 0).repeat_interleave(group, dim=1)[:, :, None, None]
    return torch.where(nonempty, out, torch.zeros((), dtype=out.dtype, device=out.device))


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str | None = None,
    splits: int | None = None,
    config: DecodeConfig | None = None,
    bounds: torch.Tensor | None = None,
    max_cap: int | None = None,
    logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over a ragged cache.

    Args:
        q: ``[B, Hq, 1, D]`` post-RoPE queries (any strides).
        k, v: ``[B, Hkv, cap, D]`` cache buffers; query head ``h`` uses KV head ``h // (Hq // Hkv)``. With
            ``bounds``: ``[1, Hkv, T, D]``, sequence ``b``'s rows at token slots ``[bounds[b], bounds[b + 1])``.
        length: ``[B, Hkv]`` integer count of valid entries ``[0, length)`` of each row (clamped to ``cap``, or
            with ``bounds`` to the row's own capacity ``bounds[b + 1] - bounds[b]``).
        scale: logit scale, ``D ** -0.5`` by default.
        backend: ``"triton"`` or ``"torch"`` to force one; by default CUDA tensors and CPU tensors under
            ``TRITON_INTERPRET=1`` use Triton, other CPU tensors the PyTorch fallback.
        splits: number of key-axis splits (Triton; default from ``num_splits``).
        bounds: ``[B + 1]`` int64 row starts of the ragged layout (``CompressedLayer.bounds``); None: padded.
        max_cap: with ``bounds``, the largest row capacity (``CompressedLayer.capacity``), which sizes the
            splits; None reads it from ``bounds``, a host sync that a captured CUDA graph cannot contain.
        logits: buffers for the logits as well (padded layout; ``rope_append_attention`` says what they hold).

    Returns:
        ``[B, Hq, 1, D]`` in ``q``'s dtype; rows with no valid entry give 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend is None:
        backend = "triton" if runs_triton(q) else "torch"
    if backend == "triton":
        cfg = config or DEFAULT_CONFIG
        return _decode_attention_triton(q, k, v, length, scale, splits, cfg, bounds, max_cap, logits=logits)
    if backend == "torch":
        if logits is not None:
            _logits_torch(q, k, length, scale, logits)
        return decode_attention_torch(q, k, v, length, scale, bounds, max_cap)
    raise ValueError(f"backend must be 'triton', 'torch' or None; got {backend!r}")


def rope_append_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    length: torch.Tensor,
    positions: torch.Tensor,
    seen: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    *,
    backend: str | None = None,
    splits: int | None = None,
    config: DecodeConfig | None = None,
    bounds: torch.Tensor | None = None,
    max_cap: int | None = None,
    logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_append` (vlcache/kernels/fused_ops.py) then `decode_attention` over the cache it appended to, in
    one launch (two with key-axis splits, the second merging them): each program rotates its group's queries and
    its KV head's new key from `qkv`, split 0 of each row writes the new entry (key, value, position) where the
    row has room and takes it into its softmax from registers, and the row's length is advanced after every
    split has read it (by the program itself with one split, else by the merging launch). Same arguments as the
    two functions.

    `logits` (`(lg, lse)`, float32 `[≥ B·Hkv, ≥ G, ≥ cap]` and `[≥ B, ≥ Hq, S]`, S a power of 2 of at least the
    splits; padded layout): the attention's own logits, for H2O's running scores without reading the keys again
    (rule_ops.h2o_step_): `lg[b·Hkv + h, g, j]` = `q·k_j · scale · log2(e)` of query head `h·G + g` over each valid
    entry `j` (the new one included), and `lse[b, hq, :]` each split's log2-sum-exp2 of them (-inf where unused),
    so `exp2(lg - log2(Σ exp2(lse)))` is the attention row.

    Returns `(q, out)`: the rotated queries and the attention output, both `[B, Hq, 1, D]`.
    """
    scale = keys.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend is None:
        backend = "triton" if runs_triton(qkv) else "torch"
    if backend == "torch":  # rope_append checks the shapes
        q = rope_append(qkv, cos, sin, keys, values, length, positions, seen, num_heads, backend="torch", bounds=bounds)
        if logits is not None:
            _logits_torch(q, keys, length, scale, logits)
        return q, decode_attention_torch(q, keys, values, length, scale, bounds, max_cap)
    if backend != "triton":
        raise ValueError(f"backend must be 'triton', 'torch' or None; got {backend!r}")
    check_append(qkv, cos, sin, keys, values, num_heads, bounds)
    q = torch.empty(qkv.shape[0], num_heads, 1, keys.shape[-1], dtype=qkv.dtype, device=qkv.device)
    out = _decode_attention_triton(
        q, keys, values, length, scale, splits, config or DEFAULT_CONFIG, bounds, max_cap,
        append=(qkv, cos, sin, positions, seen), logits=logits,
    )  # fmt: skip
    return q, out


def _logits_torch(q, k, length, scale, logits) -> None:
    """The `logits` outputs of `rope_append_attention` in PyTorch (one split: its log2-sum-exp2 in slot 0)."""
    lg, lse = logits
    B, Hq, Hkv, cap, D = _check(q, k, k, length)
    _check_logits(logits, B, Hq, Hkv, cap, 1, False)
    G = Hq // Hkv
    x = torch.matmul(q.float().view(B, Hkv, G, D), k.float().transpose(-1, -2)) * (scale * _LOG2E)
    valid = (torch.arange(cap, device=k.device) < length[..., None])[:, :, None]
    x = x.masked_fill(~valid, float("-inf"))
    lg[: B * Hkv, :G, :cap] = x.reshape(B * Hkv, G, cap)
    lse[:B, :Hq].fill_(float("-inf"))
    lse[:B, :Hq, 0] = torch.logsumexp(x * math.log(2), -1).reshape(B, Hq) / math.log(2)
