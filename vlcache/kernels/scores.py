"""Triton scoring core: column sums of row-normalised attention and VL-Cache sparsity counts.

Serves every attention-based eviction rule of the framework (policies.md §4):

* H2O (Zhang et al. 2023): accumulated attention ``Σ_q A[q, j]`` over all prompt rows, and the
  decode rule with a single new row;
* SnapKV / PyramidKV (Li et al. 2024; Cai et al. 2024): votes of the last ``w`` rows (the
  observation window) before pooling;
* VL-Cache (Tu et al. 2024): post-vision attention scores (§4.2) and the layer sparsity
  ``#{A[q, j] < p · max_j A[q, j]} / #visible`` (§4.1, relative threshold);
* Elastic Cache (Liu et al. 2024) and LOOK-M (Wan et al. 2024): prompt-wide importance.

``A = softmax(q kᵀ · scale)`` is normalised over each row's visible keys (``j <= q_pos`` and
``key_valid``); the rows × keys matrix is never stored. Two streaming passes over the keys:

1. ``_row_stats_kernel``: per row, the running max and sum of exponentials (online softmax, as in
   FlashAttention), with the key axis split over programs when the row set is small (a few
   post-vision rows over 32K keys would otherwise occupy a handful of SMs); the split partials
   are merged by ``_combine_kernel``.
2. recompute the logits block by block and accumulate the column sums over the rows and the
   query heads of each KV group, without float atomics (deterministic):
   * ``_col_rows_kernel`` when all G·Nq rows of a group fit one tile (post-vision rows,
     observation windows, decode rows): rows stay on chip, keys stream past in a pipelined loop
     split over programs, each key block's column sum is stored once;
   * ``_col_kernel`` otherwise (all prompt rows): one program per (batch, KV head, key block)
     keeps its key tile on chip and loops over row tiles, skipping those that end before it.
   The sparsity counts are reduced per program and query head and added with integer atomics
   (exact, order-independent).

All softmax statistics, exponentials and sums are float32 whatever the input dtype; the logits
are kept in the log2 domain (``qk · scale · log2 e``) so the kernels use ``exp2``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import interpreting, runs_triton
from .scores_ref import AttentionScores, attention_scores_torch, check_inputs

__all__ = ["AttentionScores", "attention_scores"]

_LOG2E = 1.4426950408889634


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, pos_ptr, valid_ptr, mpart_ptr, lpart_ptr,
    Nq, Nk, D, G, R, Hkv, NSPLIT, keys_per_split, qk_scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_pb, s_pn, s_vb,
    HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, FINAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows of all G query heads of one KV head are stacked on the M axis (row i is head
    # i // Nq, query i % Nq), so each key tile loaded serves the whole GQA group.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)  # int64: batch offsets of large caches overflow int32
    g = pid_bh % Hkv

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    h = g * G + rows // Nq
    r = rows % Nq
    pos = tl.load(pos_ptr + b * s_pb + r * s_pn, mask=row_ok, other=-1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D  # head dims that are not a power of two (80, 96) pad the block

    q = tl.load(
        q_ptr + b * s_qb + h[:, None].to(tl.int64) * s_qh + r[:, None] * s_qn + d[None, :] * s_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:  # interpreter: bf16 tl.dot is wrong there, fp32 is exact
        q = q.to(tl.float32)
    k_base = k_ptr + b * s_kb + g.to(tl.int64) * s_kh

    lo = pid_s * keys_per_split
    # Causality: no row of this tile sees past its largest position, so stop there.
    hi = tl.minimum(tl.minimum(lo + keys_per_split, Nk), tl.max(pos) + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Nk
        kt = tl.load(
            k_base + cols[None, :] * s_kn + d[:, None] * s_kd,
            mask=col_ok[None, :] & d_ok[:, None], other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:  # fp32 inputs: no tf32 rounding of the logits
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        vis = (cols[None, :] <= pos[:, None]) & col_ok[None, :]
        if HAS_VALID:
            kv = tl.load(valid_ptr + b * s_vb + cols, mask=col_ok, other=0)
            vis = vis & (kv != 0)[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps max -inf; shift by 0 instead so that
        # exp2(-inf - shift) = 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    out = (pid_bh * NSPLIT + pid_s).to(tl.int64) * R + rows
    if FINAL:  # one split: write the final (rowmax, log-sum-exp) and skip the merge launch
        _finalize(mpart_ptr + out, lpart_ptr + out, m_i, l_i, row_ok)
    else:
        tl.store(mpart_ptr + out, m_i, mask=row_ok)
        tl.store(lpart_ptr + out, l_i, mask=row_ok)


@triton.jit
def _finalize(m_out, lse_out, m, sumexp, ok):
    # Rows that see nothing get finite stats (0, 0): pass 2 masks them out anyway, and finite
    # values keep inf - inf (NaN) out of the masked-off lanes.
    has = sumexp > 0.0
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = tl.where(has, m_safe + tl.log2(tl.where(has, sumexp, 1.0)), 0.0)
    tl.store(m_out, m_safe, mask=ok)
    tl.store(lse_out, lse, mask=ok)


@triton.jit
def _combine_kernel(
    mpart_ptr, lpart_ptr, m_ptr, lse_ptr, R, NSPLIT,
    BLOCK_R: tl.constexpr,
):
    # Merge the key-split partials of pass 1: M = max_s m_s, L = Σ_s l_s 2^(m_s - M).
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < R
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(0, NSPLIT):
        ms = tl.load(mpart_ptr + (pid_bh * NSPLIT + s) * R + rows, mask=ok, other=float("-inf"))
        m = tl.maximum(m, ms)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for s in range(0, NSPLIT):
        ms = tl.load(mpart_ptr + (pid_bh * NSPLIT + s) * R + rows, mask=ok, other=float("-inf"))
        ls = tl.load(lpart_ptr + (pid_bh * NSPLIT + s) * R + rows, mask=ok, other=0.0)
        acc += ls * tl.exp2(ms - m_safe)
    _finalize(m_ptr + pid_bh * R + rows, lse_ptr + pid_bh * R + rows, m, acc, ok)


@triton.jit
def _col_kernel(
    q_ptr, k_ptr, pos_ptr, valid_ptr, m_ptr, lse_ptr, col_ptr, below_ptr, vis_ptr,
    Nq, Nk, D, G, R, Hkv, qk_scale, log2_p,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_pb, s_pn, s_vb,
    HAS_VALID: tl.constexpr, COUNT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    g = pid_bh % Hkv

    k_start = pid_n * BLOCK_N
    cols = k_start + tl.arange(0, BLOCK_N)
    col_ok = cols < Nk
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    # The key tile stays on chip for the whole program; rows stream past it.
    kt = tl.load(
        k_ptr + b * s_kb + g.to(tl.int64) * s_kh + cols[None, :] * s_kn + d[:, None] * s_kd,
        mask=col_ok[None, :] & d_ok[:, None], other=0.0,
    )
    if UPCAST:
        kt = kt.to(tl.float32)
    key_ok = col_ok
    if HAS_VALID:
        kv = tl.load(valid_ptr + b * s_vb + cols, mask=col_ok, other=0)
        key_ok = key_ok & (kv != 0)

    # Row tiles before the first one that reaches this key block see none of it (causal upper
    # triangle): start the row loop there. Later tiles that see nothing are masked to zero, so
    # this is exact for any q_pos, and it keeps the row loop free of branches, which Triton's
    # software pipeliner needs to prefetch the next q tile while this one is in the tensor cores.
    first = pid_n * 0 + Nq  # a tensor from the start: Nq == 1 is specialised to a constant
    for r0 in range(0, Nq, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        pos = tl.load(pos_ptr + b * s_pb + r * s_pn, mask=r < Nq, other=-1)
        first = tl.minimum(first, tl.where(tl.max(pos) >= k_start, r0, Nq))

    acc = tl.zeros([BLOCK_N], tl.float32)
    stat_base = pid_bh.to(tl.int64) * R
    for hl in range(0, G):
        h = (g * G + hl).to(tl.int64)
        below_v = tl.zeros([BLOCK_M], tl.int32)
        vis_v = tl.zeros([BLOCK_M], tl.int32)
        for r0 in range(first, Nq, BLOCK_M):
            r = r0 + tl.arange(0, BLOCK_M)
            r_ok = r < Nq
            pos = tl.load(pos_ptr + b * s_pb + r * s_pn, mask=r_ok, other=-1)
            q = tl.load(
                q_ptr + b * s_qb + h * s_qh + r[:, None] * s_qn + d[None, :] * s_qd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0,
            )
            if UPCAST:
                q = q.to(tl.float32)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            vis = (cols[None, :] <= pos[:, None]) & key_ok[None, :]
            lse = tl.load(lse_ptr + stat_base + hl * Nq + r, mask=r_ok, other=0.0)
            p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            acc += tl.sum(p, 0)
            if COUNT:
                # prob < p·maxprob with maxprob = 2^(rowmax - lse); counts packed as in
                # _col_rows_kernel (one reduction, fewer live registers)
                m = tl.load(m_ptr + stat_base + hl * Nq + r, mask=r_ok, other=0.0)
                p_min = tl.exp2(m - lse + log2_p)
                packed = tl.sum(tl.where(vis, tl.where(p < p_min[:, None], 65537, 1), 0), 1)
                vis_v += packed & 0xFFFF
                below_v += packed >> 16
        if COUNT:
            # Integer atomics: exact and order-independent, and they save the launches that
            # reducing per-program partials would cost (launches dominate at small row counts).
            cidx = pid_bh.to(tl.int64) * G + hl  # == b * Hq + h
            tl.atomic_add(below_ptr + cidx, tl.sum(below_v, 0).to(tl.int64), sem="relaxed")
            tl.atomic_add(vis_ptr + cidx, tl.sum(vis_v, 0).to(tl.int64), sem="relaxed")

    tl.store(col_ptr + pid_bh.to(tl.int64) * Nk + cols, acc, mask=col_ok)


@triton.jit
def _col_rows_kernel(
    q_ptr, k_ptr, pos_ptr, valid_ptr, m_ptr, lse_ptr, col_ptr, below_ptr, vis_ptr,
    Nq, Nk, D, G, R, Hkv, NSPLIT, keys_per_split, qk_scale, log2_p,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_pb, s_pn, s_vb,
    HAS_VALID: tl.constexpr, COUNT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G_P2: tl.constexpr,
):
    # Pass 2 for small row sets (all G·Nq rows of a KV group fit one tile: post-vision rows,
    # observation windows, decode rows). The rows stay on chip and the keys stream past them in
    # a software-pipelined loop, like pass 1; each key block's column sum is complete after one
    # tile, so it is stored directly. (Keeping a key tile and looping over a handful of row
    # tiles instead leaves each program a short chain of dependent loads: latency-bound.)
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    g = pid_bh % Hkv

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < R
    h = g * G + rows // Nq
    r = rows % Nq
    pos = tl.load(pos_ptr + b * s_pb + r * s_pn, mask=row_ok, other=-1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        q_ptr + b * s_qb + h[:, None].to(tl.int64) * s_qh + r[:, None] * s_qn + d[None, :] * s_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    stat = pid_bh.to(tl.int64) * R + rows
    lse = tl.load(lse_ptr + stat, mask=row_ok, other=0.0)
    if COUNT:
        # prob < p·maxprob, with maxprob = 2^(rowmax - lse): a per-row bound on the normalised
        # probability, so the loop compares the p it already has instead of keeping the logits
        # (the logit form, logit - rowmax < log2 p, held ~80 more registers per thread).
        m = tl.load(m_ptr + stat, mask=row_ok, other=0.0)
        p_min = tl.exp2(m - lse + log2_p)
    k_base = k_ptr + b * s_kb + g.to(tl.int64) * s_kh
    col_base = col_ptr + pid_bh.to(tl.int64) * Nk

    below_v = tl.zeros([BLOCK_M], tl.int32)
    vis_v = tl.zeros([BLOCK_M], tl.int32)
    lo = pid_s * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Nk)  # every key is stored, visible to some row or not
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < Nk
        kt = tl.load(
            k_base + cols[None, :] * s_kn + d[:, None] * s_kd,
            mask=col_ok[None, :] & d_ok[:, None], other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale
        vis = (cols[None, :] <= pos[:, None]) & col_ok[None, :]
        if HAS_VALID:
            kv = tl.load(valid_ptr + b * s_vb + cols, mask=col_ok, other=0)
            vis = vis & (kv != 0)[None, :]
        p = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
        tl.store(col_base + cols, tl.sum(p, 0), mask=col_ok)
        if COUNT:
            # One reduction for both counts: visible in the low 16 bits, below in the high ones
            # (at most BLOCK_N per row and block).
            packed = tl.sum(tl.where(vis, tl.where(p < p_min[:, None], 65537, 1), 0), 1)
            vis_v += packed & 0xFFFF
            below_v += packed >> 16
    if COUNT:
        # Rows -> query heads of the group with a one-hot reduction, then one integer atomic per
        # head (the key splits of a group add into the same counters).
        hh = tl.arange(0, G_P2)
        onehot = (rows // Nq)[:, None] == hh[None, :]
        below_h = tl.sum(tl.where(onehot, below_v[:, None], 0), 0)
        vis_h = tl.sum(tl.where(onehot, vis_v[:, None], 0), 0)
        cidx = pid_bh.to(tl.int64) * G + hh  # == b * Hq + g * G + hh
        tl.atomic_add(below_ptr + cidx, below_h.to(tl.int64), mask=hh < G, sem="relaxed")
        tl.atomic_add(vis_ptr + cidx, vis_h.to(tl.int64), mask=hh < G, sem="relaxed")


@dataclass(frozen=True)
class _Config:
    """Tile shapes and launch parameters (chosen by ``_pick_config``; tests may override)."""

    block_m1: int  # rows per pass-1 tile (stacked over the GQA group)
    block_n1: int  # keys per pass-1 iteration
    nsplit: int  # key-axis splits of pass 1
    # Pass 2. rows_stationary (all G·Nq rows in one tile of block_m2 rows, needs block_m2 >= G·Nq):
    # block_n2 keys per iteration, nsplit2 key splits. Otherwise (key-stationary): block_n2 keys
    # per program, row tiles of block_m2 rows of one query head at a time.
    block_m2: int
    block_n2: int
    rows_stationary: bool = False
    nsplit2: int = 1
    warps1: int = 4
    stages1: int = 3
    warps2: int = 4
    stages2: int = 2


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


@functools.cache
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: few programs keep it fast while still splitting the key axis


@functools.lru_cache(maxsize=512)  # host time matters: one call per layer, a few launches each
def _pick_config(B: int, Hkv: int, G: int, Nq: int, Nk: int, D: int, device: torch.device) -> _Config:
    interp = device.type != "cuda"
    R = G * Nq
    sms = _num_sms(device)
    if interp:
        # Small tiles so that the short test sequences still exercise multi-block loops,
        # splits and tile skipping; the interpreter's cost is per program, not per element.
        bm1, bn1, w1, s1 = _pow2_clamp(R, 16, 32), 32, 4, 3
        rows_stat = R <= 128
        bm2 = _pow2_clamp(R, 16, 128) if rows_stat else _pow2_clamp(Nq, 16, 32)
        bn2, w2, s2 = 32, 4, 2
    else:
        # Hopper (H200 sweep of bench_scoring.py --sweep, ptxas register reports). Pass 1:
        # 128-row tiles with 8 warps give full-height MMAs; 64-key steps keep the fp32 logit tile
        # small and leave room for 3 stages of K prefetch (110 registers, no spills).
        bm1 = _pow2_clamp(R, 16, 128)
        bn1, s1 = 64, 3
        w1 = 8 if bm1 >= 128 else 4
        rows_stat = R <= 256
        if rows_stat:  # all rows in one tile, 64-key steps pipelined like pass 1 (145-195 regs)
            bm2 = _pow2_clamp(R, 16, 256)
            bn2, s2 = 64, 3
            w2 = 8 if bm2 >= 128 else 4
        else:
            # Key-stationary: 64-key tiles and 64-row steps of 4 warps measured fastest; 128-key
            # tiles need ~250 registers (column vectors replicated in the MMA layout) and spill.
            bm2 = _pow2_clamp(Nq, 16, 64)
            bn2, w2, s2 = 64, 4, 2
    # Key splits: about one to two waves of programs (8-warp programs fit one per SM at these
    # register counts, 4-warp ones about three); the sweep found 4 per SM slower than 2.
    per_sm1 = 2 if w1 == 8 else 4
    n_tiles = triton.cdiv(R, bm1) * B * Hkv
    nsplit = max(1, min(triton.cdiv(Nk, bn1), triton.cdiv(per_sm1 * sms, n_tiles)))
    nsplit2 = 1
    if rows_stat:
        per_sm2 = 2 if w2 == 8 else 4
        nsplit2 = max(1, min(triton.cdiv(Nk, bn2), triton.cdiv(per_sm2 * sms, B * Hkv)))
    return _Config(
        block_m1=bm1, block_n1=bn1, nsplit=nsplit, block_m2=bm2, block_n2=bn2, rows_stationary=rows_stat,
        nsplit2=nsplit2, warps1=w1, stages1=s1, warps2=w2, stages2=s2,
    )


def _attention_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    threshold: float | None = None,
    config: _Config | None = None,
) -> AttentionScores:
    B, Hq, Hkv, Nq, Nk, D = check_inputs(q, k, q_pos, key_valid, threshold)
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype; got {q.dtype} and {k.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    G = Hq // Hkv
    R = G * Nq
    dev = q.device
    scale = D**-0.5 if scale is None else float(scale)
    count = threshold is not None
    if Nq == 0 or Nk == 0:
        z = torch.zeros(B, Hq, dtype=torch.int64, device=dev) if count else None
        col0 = torch.zeros(B, Hkv, Nk, dtype=torch.float32, device=dev)
        return AttentionScores(col=col0, below=z, visible=None if z is None else z.clone())
    # empty, not zeros: every column is stored by exactly one pass-2 program, and tests would
    # see garbage if one were not.
    col = torch.empty(B, Hkv, Nk, dtype=torch.float32, device=dev)

    interp = dev.type != "cuda"
    if interp and not interpreting():
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    cfg = config or _pick_config(B, Hkv, G, Nq, Nk, D, dev)
    # Used as is (no clamp, no copy: each extra launch costs more than these kernels' work at
    # small row counts): positions past the last key see every key, negative ones see nothing.
    pos = q_pos if q_pos.dtype in (torch.int32, torch.int64) else q_pos.to(torch.int32)
    if key_valid is not None:
        valid = key_valid.contiguous().view(torch.uint8)
        s_vb = valid.stride(0)
    else:
        valid = pos  # never read (HAS_VALID=False); any tensor serves as the pointer
        s_vb = 0
    block_d = max(16, triton.next_power_of_2(D))
    upcast = interp  # the interpreter's bf16 dot is broken; fp32 there is exact for all inputs
    ieee = interp or q.dtype == torch.float32
    qk_scale = scale * _LOG2E

    nkb1 = triton.cdiv(Nk, cfg.block_n1)
    nsplit = max(1, min(cfg.nsplit, nkb1))
    keys_per_split = triton.cdiv(nkb1, nsplit) * cfg.block_n1
    nsplit = triton.cdiv(Nk, keys_per_split)
    m_row = torch.empty(B * Hkv * R, dtype=torch.float32, device=dev)
    lse_row = torch.empty_like(m_row)
    if nsplit == 1:
        mpart, lpart = m_row, lse_row  # pass 1 finalises in place
    else:
        mpart = torch.empty(B * Hkv * nsplit * R, dtype=torch.float32, device=dev)
        lpart = torch.empty_like(mpart)
    grid1 = (triton.cdiv(R, cfg.block_m1), B * Hkv, nsplit)
    _row_stats_kernel[grid1](
        q, k, pos, valid, mpart, lpart,
        Nq, Nk, D, G, R, Hkv, nsplit, keys_per_split, qk_scale,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        pos.stride(0), pos.stride(1), s_vb,
        HAS_VALID=key_valid is not None, UPCAST=upcast, IEEE=ieee, FINAL=nsplit == 1,
        BLOCK_M=cfg.block_m1, BLOCK_N=cfg.block_n1, BLOCK_D=block_d,
        num_warps=cfg.warps1, num_stages=cfg.stages1,
    )
    if nsplit > 1:
        block_r = 256
        _combine_kernel[(triton.cdiv(R, block_r), B * Hkv)](
            mpart, lpart, m_row, lse_row, R, nsplit, BLOCK_R=block_r, num_warps=4,
        )

    if count:
        counts = torch.zeros(2, B, Hq, dtype=torch.int64, device=dev)  # below, visible
        below, visible = counts[0], counts[1]
        log2_p = math.log2(float(threshold))
    else:
        below = visible = m_row  # never touched (COUNT=False)
        log2_p = 0.0
    strides = (
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        pos.stride(0), pos.stride(1), s_vb,
    )
    flags = dict(HAS_VALID=key_valid is not None, COUNT=count, UPCAST=upcast, IEEE=ieee, BLOCK_D=block_d)
    if cfg.rows_stationary:
        if cfg.block_m2 < R:
            raise ValueError(f"rows_stationary needs block_m2 >= G*Nq = {R}; got {cfg.block_m2}")
        nkb2 = triton.cdiv(Nk, cfg.block_n2)
        nsplit2 = max(1, min(cfg.nsplit2, nkb2))
        kps2 = triton.cdiv(nkb2, nsplit2) * cfg.block_n2
        nsplit2 = triton.cdiv(Nk, kps2)
        _col_rows_kernel[(nsplit2, B * Hkv)](
            q, k, pos, valid, m_row, lse_row, col, below, visible,
            Nq, Nk, D, G, R, Hkv, nsplit2, kps2, qk_scale, log2_p, *strides,
            BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, G_P2=triton.next_power_of_2(G), **flags,
            num_warps=cfg.warps2, num_stages=cfg.stages2,
        )
    else:
        _col_kernel[(triton.cdiv(Nk, cfg.block_n2), B * Hkv)](
            q, k, pos, valid, m_row, lse_row, col, below, visible,
            Nq, Nk, D, G, R, Hkv, qk_scale, log2_p, *strides,
            BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2, **flags,
            num_warps=cfg.warps2, num_stages=cfg.stages2,
        )
    if not count:
        return AttentionScores(col=col)
    return AttentionScores(col=col, below=below, visible=visible)


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    threshold: float | None = None,
    backend: str | None = None,
) -> AttentionScores:
    """Column sums of row-normalised attention and VL-Cache relative-sparsity counts.

    Args:
        q: ``[B, Hq, Nq, D]`` post-RoPE queries of the selected rows (bf16, fp16 or fp32).
        k: ``[B, Hkv, Nk, D]`` post-RoPE keys; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
        q_pos: ``[B, Nq]`` integer positions of the rows as indices into the key axis; a row
            at ``p`` sees keys ``j <= p`` (with ``key_valid``); ``p < 0`` marks a padding row
            that sees nothing.
        scale: logit scale, ``D ** -0.5`` by default.
        key_valid: ``[B, Nk]`` bool, False on padded keys (e.g. left padding); all valid if None.
        threshold: VL-Cache's relative threshold ``p`` in (0, 1); when given, ``below`` counts
            visible entries with ``A < p · rowmax A`` and ``visible`` counts visible entries.
        backend: ``"triton"`` or ``"torch"`` to force one; by default CUDA tensors and CPU
            tensors under ``TRITON_INTERPRET=1`` use Triton, other CPU tensors the PyTorch
            fallback.

    Returns:
        ``AttentionScores(col [B, Hkv, Nk] float32, below, visible [B, Hq] int64 or None)``.
    """
    if backend is None:
        backend = "triton" if runs_triton(q) else "torch"
    if backend == "triton":
        return _attention_scores_triton(q, k, q_pos, scale=scale, key_valid=key_valid, threshold=threshold)
    if backend == "torch":
        return attention_scores_torch(q, k, q_pos, scale=scale, key_valid=key_valid, threshold=threshold)
    raise ValueError(f"backend must be 'triton', 'torch' or None; got {backend!r}")
