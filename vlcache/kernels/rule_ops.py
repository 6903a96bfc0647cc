"""Graph-safe Triton forms of the decode rules' per-token cache updates (decode_rules.py, `on_token_static`).

In the CUDA-graph decode step, H2O, Elastic Cache's fixed point and StreamingLLM's rolling cache update every layer
after every token. As PyTorch ops that is 15-35 launches per layer (at batch 1 about as long as the rest of a 7B
model's step) and, at long rows, a gather of the whole reserved buffer into a temporary (`CompressedLayer.drop_`)
and H2O's keys in float32. Here a rule costs one to three launches per layer, which move only the entries that move:

* `shift_rows_`: deletes entries `[start, start + count)` of each (sequence, KV head) row in place, shifting the
  later valid entries left, and `length -= count` (what `CompressedLayer.drop_` does); `drop_oldest_` (Rolling)
  and `drop_fixed_point_` (FixedPoint) compute that block from the rule's state in the same launch;
  `drop_fixed_point_layers_` does FixedPoint's for every layer in one launch (at the end of the decode step,
  `FixedPoint.on_step_static`), reaching each layer's buffers by element offsets from layer 0's (`layer_offsets`).
* `h2o_step_`: H2O's update (Zhang et al., NeurIPS 2023, Algorithm 1): the decode query's attention added to the
  running scores, the victim, its deletion. H2O does not need the cache's order (its recent window is found by
  position), so the deletion moves one entry, the row's last, into the victim's slot instead of shifting; and in
  the fused step its logits come from the attention kernel itself, so the keys are not read a second time.

For the shifts (and H2O's passes), long rows are cut into chunks of `per` entries (whole `block_n` blocks, computed
in the kernel from the row's length), one program each; the number of chunks depends only on the shapes
(`num_splits`), so a captured graph stays valid as lengths change. A left shift by `count` makes chunk k read the
first `count` entries of chunk k+1, which chunk k+1 may already have overwritten: a first launch copies each chunk's
first `side` entries to a side buffer, and the shift reads them from there. A row whose `count` exceeds `side` is
shifted by its first program alone (serially, always correct). Count bounds: Rolling deletes at most one entry per
row and step (`count = length > keep`); FixedPoint deletes `excess = length - limit`, normally 0 or 1 but unbounded,
and runs one program per row (its moved span is short: from `N_tl` = keep - 24 to the end).

Scratch (`RuleScratch`) is allocated once per device, before the capture (Rolling: `prepare_static`; H2O: its first
update, the fast path's eager warm-up step, where the query's group is known), and shared by the layers, which run
one after the other; so the captured step allocates nothing.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .decode_attention import DEFAULT_CONFIG as ATTENTION_CONFIG
from .launch import interpreting, on_device, runs_triton, sm_count

__all__ = [
    "RuleConfig",
    "RuleScratch",
    "drop_fixed_point_",
    "drop_fixed_point_layers_",
    "drop_oldest_",
    "h2o_step_",
    "h2o_window",
    "layer_offsets",
    "num_splits",
    "shift_rows_",
    "supported",
]

_BIG = tl.constexpr(2**62)  # the index of "no candidate" in partial argmins
LSE_SLOTS = triton.next_power_of_2(ATTENTION_CONFIG.max_splits)  # H2O: the attention's splits, at most
_PARTS = 5  # H2O's int64 selection partials per split (`RuleScratch.part_i`): see `_h2o_select_kernel`


@dataclasses.dataclass
class RuleConfig:
    """Launch parameters. A row is split into at most ``max_splits`` chunks of at least ``min_per_split`` entries
    (of the capacity), aiming at ``waves × SMs`` programs; ``block_n`` is the unit of a chunk and H2O's key tile
    (``select_block_n`` its tile where it reads the logits, not the keys: the scores pass, and its one-program form
    when the attention wrote the logits),
    ``block_s`` the shift's tile, ``shift_warps`` its warps. ``precision``: how H2O's float32 logits are computed
    (``"auto"``: ``"split"`` for 16-bit keys, ``"ieee"`` for float32 ones): ``"split"``, the scaled query as three
    parts of the keys' 16-bit type (their sum is the query to float32 precision) on tensor cores, each part's
    products with a key exact in float32, so the logits agree with the float32 form to float32 rounding; ``"ieee"``,
    float32 FMAs (on 16-bit keys they spill registers: slow); ``"tf32x3"``, tensor cores on float32 operands (about
    2^-21 relative).

    ``shift_warps`` 8 rather than ``num_warps``' 4: a shift program's serial tiles (load all, then store all: their
    sources and destinations overlap) spread over more threads. On an H200 (bench_rules.py --kernels) H2O's shift (when
    H2O still shifted) took
    862 against 953 µs a step at batch 1, 128K prompt, and 761 against 851 at batch 64, 2K; the fixed point's update
    0.446 against 0.489 ms at batch 64, 2K (results/bench/rules_h2o_warps_h200.json, rules_fp_warps_h200.json). H2O's
    logits and scores passes were slower with 8 (634 against 469 µs at batch 1, 128K), so they keep ``num_warps``.

    ``select_block_n`` 128: with the logits from the attention, H2O's update took 0.487 → 0.385 ms a step at batch 1,
    128K prompt, 0.434 → 0.320 at batch 4, 32K and 0.427 → 0.375 at batch 64, 2K against 64, and within 0.01 ms at
    batch 1 and 2K and 32K (256: 0.366, 0.318, 0.383; H200, bench_rules.py --with-attention --select-block-n,
    results/bench/rules_h2o_attn_sel*_h200.json, one call).

    ``h2o_finish``: where H2O's split rows pick their victim: ``"fused"``, the row's last split program to finish
    (after a per-row atomic counter), or ``"launch"``, a launch of its own. Alone the two are as fast (0.217 /
    0.609 / 0.968 / 1.018 against 0.221 / 0.595 / 0.961 / 1.045 ms a step at batch 1 and 2K, 32K, 128K prompts and
    batch 64, 2K, with the logits launch, on an H200: bench_rules.py --h2o-finish, results/bench/rules_h2o_finish_*);
    ``"fused"`` is one launch fewer per layer in the captured step.

    ``min_per_split`` 64 rather than 256: H2O's rows of a few hundred to a few thousand entries then split, which
    cut its update at batch 1 by about a third on an H200 (experiments/bench_rules.py, results/bench/rules_h2o_mps*).
    The split form's scores round differently from the one-program form's (the softmax normaliser comes from
    per-split partials), so a float32 near-tie can pick the other of two victims: the first such case in 854,528
    decisions at batch 64, 2K prompt, was 4.1e-8 apart in float64 (experiments/h2o_split_check.py)."""

    block_n: int = 64
    select_block_n: int = 128
    block_s: int = 32
    waves: int = 4
    min_per_split: int = 64
    max_splits: int = 64
    num_warps: int = 4
    shift_warps: int = 8
    precision: str = "auto"
    h2o_finish: str = "fused"


DEFAULT_CONFIG = RuleConfig()


def supported(t: torch.Tensor) -> bool:
    """Whether the rules take their Triton form on `t` (`launch.runs_triton`; the one switch that tests and
    experiments/bench_rules.py turn off to run the PyTorch form)."""
    return runs_triton(t)


def num_splits(rows: int, cap: int, device: torch.device, config: RuleConfig | None = None) -> int:
    """Chunks per row: a function of the shapes only (not the lengths), so a captured graph stays valid."""
    config = config or DEFAULT_CONFIG
    want = triton.cdiv(config.waves * sm_count(device), rows)
    return max(1, min(want, cap // config.min_per_split, config.max_splits))


class RuleScratch:
    """Buffers for the launches of one device, allocated once (`prepare_static`) and shared by the layers.

    `side_*`: each chunk's first `side` entries (keys, values, positions, the extra row; H2O, which never shifts,
    makes them with `side` 0: empty, and its launches are not given them); `nbuf`: each row's length
    before the update (read by the shift while its first program rewrites `length`); with `group`, H2O's float32
    logits `[rows, group, cap]` (written by its own launch or by the attention, with its per-split log2-sum-exp2s
    `lse`), per-split softmax max/sum and selection partials.
    """

    def __init__(self, keys: torch.Tensor, cap: int, splits: int, side: int, group: int = 0) -> None:
        b, h, _, d = keys.shape
        rows, dev, f32 = b * h, keys.device, torch.float32
        self.rows, self.cap, self.splits, self.side, self.group = rows, cap, splits, side, group
        self.nbuf = torch.zeros(rows, dtype=torch.long, device=dev)
        self.side_k = torch.zeros(rows, splits, side, d, dtype=keys.dtype, device=dev)
        self.side_v = torch.zeros_like(self.side_k)
        self.side_p = torch.zeros(rows, splits, side, dtype=torch.long, device=dev)
        self.side_e = torch.zeros(rows, splits, side, dtype=f32, device=dev)
        if group:
            self.logits = torch.zeros(rows, group, cap, dtype=f32, device=dev)
            # the attention's per-split log2-sum-exp2 (rope_append_attention(logits=...)), up to its most splits
            self.lse = torch.zeros(b, h * group, LSE_SLOTS, dtype=f32, device=dev)
            self.part_m = torch.zeros(rows, splits, group, dtype=f32, device=dev)
            self.part_l = torch.zeros_like(self.part_m)
            self.part_v = torch.zeros(rows, splits, dtype=f32, device=dev)
            self.part_i = torch.zeros(rows, splits, _PARTS, dtype=torch.long, device=dev)
            self.count = torch.zeros(rows, dtype=torch.int32, device=dev)  # splits done per row (0 between steps)

    @classmethod
    def for_layers(
        cls, layers, *, side: int, group: int = 0, config: RuleConfig | None = None, copies: int = 1
    ) -> list:
        """`copies` scratches per device, sized to the largest capacity there; returned per layer, layer i taking
        copy `i % copies` (H2O's update on a side stream, vlcache/engine/side_stream.py: 2)."""
        made = {}
        for layer in layers:
            keys = layer.keys
            if keys.device not in made:
                cap = max(other.capacity for other in layers if other.keys.device == keys.device)
                b, h = keys.shape[:2]
                splits = num_splits(b * h, cap, keys.device, config)
                made[keys.device] = [cls(keys, cap, splits, side, group) for _ in range(copies)]
        return [made[layer.keys.device][i % copies] for i, layer in enumerate(layers)]

    def check(self, keys: torch.Tensor, splits: int, group: int = 0) -> None:
        b, h, cap, _ = keys.shape
        if b * h > self.rows or cap > self.cap or splits > self.splits or group > self.group:
            raise ValueError(
                f"scratch for {self.rows} rows x {self.cap} x {self.splits} splits x group "
                f"{self.group} is too small for {tuple(keys.shape)}, {splits} splits, group {group}"
            )


# -- the shift -------------------------------------------------------------------------------------------------
# packed argument lists, as in the other kernel files
# fmt: off
@triton.jit
def _per(n, NCHUNK, BLOCK: tl.constexpr):
    """Entries per chunk of a row of `n` valid entries: whole blocks, at least one."""
    return tl.maximum(tl.cdiv(tl.cdiv(n, NCHUNK), BLOCK), 1) * BLOCK


@triton.jit
def _shift_row(
    k_row, v_row, p_row, e_row, sk_row, sv_row, sp_row, se_row,
    s_kn, s_vn, s_pn, s_en,
    n, start, count, chunk, per, NCHUNK, cap, D,
    HAS_EXTRA: tl.constexpr, ZERO_EXTRA: tl.constexpr, SIDE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's part of deleting `[start, start + count)` from a row of `n` entries (`*_row`: the row's
    entry 0 in the cache, and in the side buffers, whose chunk c entry i is `c * SIDE + i`)."""
    par = count <= SIDE  # chunked; else the first program shifts the whole row
    end = n - count  # the new length
    s = tl.maximum(start, 0)
    lo = tl.where(par, tl.maximum(chunk * per, s), tl.where(chunk == 0, s, end))
    hi = tl.where(par, tl.minimum((chunk + 1) * per, end), end)
    hi = tl.where(count > 0, hi, lo)  # nothing to delete: nothing moves
    nxt = tl.where(par, (chunk + 1) * per, n)  # the next chunk's first entry: read from the side buffer if it moves
    lim = tl.where(nxt < end, nxt, n)  # sources from `lim` on come from the side buffer
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    for j0 in range(lo, hi, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        ok = j < hi
        src = j + count
        # (scalar conditions folded into vector comparisons: the interpreter mistypes scalar & vector masks)
        side = ok & (src >= lim)
        main = ok & (src < lim)
        sj = (chunk + 1) * SIDE + src - nxt
        m2, s2 = main[:, None] & d_ok[None, :], side[:, None] & d_ok[None, :]
        kt = tl.load(k_row + src[:, None] * s_kn + d[None, :], mask=m2)
        kt = tl.where(s2, tl.load(sk_row + sj[:, None] * D + d[None, :], mask=s2), kt)
        vt = tl.load(v_row + src[:, None] * s_vn + d[None, :], mask=m2)
        vt = tl.where(s2, tl.load(sv_row + sj[:, None] * D + d[None, :], mask=s2), vt)
        pt = tl.load(p_row + src * s_pn, mask=main)
        pt = tl.where(side, tl.load(sp_row + sj, mask=side), pt)
        if HAS_EXTRA:
            et = tl.load(e_row + src * s_en, mask=main)
            et = tl.where(side, tl.load(se_row + sj, mask=side), et)
        # every load of the tile before any store: its sources and destinations overlap (other threads' entries)
        tl.debug_barrier()
        o2 = ok[:, None] & d_ok[None, :]
        tl.store(k_row + j[:, None] * s_kn + d[None, :], kt, mask=o2)
        tl.store(v_row + j[:, None] * s_vn + d[None, :], vt, mask=o2)
        tl.store(p_row + j * s_pn, pt, mask=ok)
        if HAS_EXTRA:
            tl.store(e_row + j * s_en, et, mask=ok)
    if ZERO_EXTRA:  # freed and spare slots of the extra row restart at 0
        tl.debug_barrier()
        # [end, n) was read by the program whose range ends at end - 1: that one clears it
        owner = tl.where(par, tl.maximum(end - 1, 0) // per, 0)
        for z0 in range(tl.where(chunk == owner, tl.maximum(end, 0), n), n, BLOCK_S):
            z = z0 + tl.arange(0, BLOCK_S)
            tl.store(e_row + z * s_en, tl.zeros([BLOCK_S], tl.float32), mask=z < n)
        zp = tl.cdiv(cap - n, NCHUNK)  # [n, cap) is read by nobody: shared out
        for z0 in range(n + chunk * zp, tl.minimum(n + (chunk + 1) * zp, cap), BLOCK_S):
            z = z0 + tl.arange(0, BLOCK_S)
            tl.store(e_row + z * s_en, tl.zeros([BLOCK_S], tl.float32), mask=z < cap)


@triton.jit
def _save_side(
    k_row, v_row, p_row, e_row, sk_row, sv_row, sp_row, se_row, s_kn, s_vn, s_pn, s_en,
    n, chunk, per, D, HAS_EXTRA: tl.constexpr, SIDE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Copies this chunk's first `SIDE` entries to the side buffer (chunk 0's are never read from there)."""
    i = tl.arange(0, SIDE)
    e = chunk * per + i
    ok = e < tl.where(chunk > 0, n, 0)
    d = tl.arange(0, BLOCK_D)
    o2 = ok[:, None] & (d < D)[None, :]
    sj = chunk * SIDE + i
    tl.store(sk_row + sj[:, None] * D + d[None, :], tl.load(k_row + e[:, None] * s_kn + d[None, :], mask=o2), mask=o2)
    tl.store(sv_row + sj[:, None] * D + d[None, :], tl.load(v_row + e[:, None] * s_vn + d[None, :], mask=o2), mask=o2)
    tl.store(sp_row + sj, tl.load(p_row + e * s_pn, mask=ok), mask=ok)
    if HAS_EXTRA:
        tl.store(se_row + sj, tl.load(e_row + e * s_en, mask=ok), mask=ok)


@triton.jit
def _save_kernel(
    k_ptr, v_ptr, p_ptr, e_ptr, len_ptr, nbuf_ptr, sk_ptr, sv_ptr, sp_ptr, se_ptr,
    H, D, NCHUNK, s_sr,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_eb, s_eh, s_en, s_lb, s_lh,
    HAS_EXTRA: tl.constexpr, SIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    b, h = row // H, row % H
    n = tl.load(len_ptr + b * s_lb + h * s_lh).to(tl.int64)
    tl.store(nbuf_ptr + row, n, mask=chunk == 0)
    _save_side(
        k_ptr + b * s_kb + h * s_kh, v_ptr + b * s_vb + h * s_vh, p_ptr + b * s_pb + h * s_ph,
        e_ptr + b * s_eb + h * s_eh, sk_ptr + row * s_sr * D, sv_ptr + row * s_sr * D, sp_ptr + row * s_sr,
        se_ptr + row * s_sr, s_kn, s_vn, s_pn, s_en, n, chunk, _per(n, NCHUNK, BLOCK_N), D,
        HAS_EXTRA, SIDE, BLOCK_D,
    )


@triton.jit
def _fixed_point_span(n, ntl, prompt_len, seen_ptr, f_ptr, m_off):
    """FixedPoint's block `(start, count)` for a row of `n` entries: `limit = ceil(budget · (prompt length + seen −
    m) − eps)` (float64 `f` = [budget, eps]), `count = max(n − limit, 0)`, `start = max(min(N_tl, n − 1, n −
    count), 0)`."""
    seen = (prompt_len + tl.load(seen_ptr) - m_off).to(tl.float64)
    y = tl.load(f_ptr) * seen - tl.load(f_ptr + 1)  # no fused multiply-add (launched without fp fusion)
    t = y.to(tl.int64)  # ceil without libdevice: truncation, plus one below a non-integer positive y
    limit = t + (t.to(tl.float64) < y).to(tl.int64)
    count = tl.maximum(n - limit, 0)
    return tl.maximum(tl.minimum(tl.minimum(ntl, n - 1), n - count), 0), count


@triton.jit
def _shift_kernel(
    k_ptr, v_ptr, p_ptr, e_ptr, len_ptr, nbuf_ptr, sk_ptr, sv_ptr, sp_ptr, se_ptr,
    a_ptr, c_ptr, f_ptr, seen_ptr,
    H, cap, D, NCHUNK, s_sr, m_off, first,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_eb, s_eh, s_en, s_lb, s_lh, s_ab, s_ah, s_cb, s_ch,
    RULE: tl.constexpr, FROM_NBUF: tl.constexpr, HAS_EXTRA: tl.constexpr, ZERO_EXTRA: tl.constexpr,
    SIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid `(rows, NCHUNK)`. Which block a row deletes (`RULE`), from the row's length `n` before the update:

    0. given: `start`, `count` = `a`, `c` `[B, H]`;
    1. Rolling: `count = n > keep` (`a`), `start = min(n - 1, first)` (the oldest entry after the sinks);
    3. FixedPoint: `limit = ceil(budget · (prompt length + seen − m) − eps)` (float64 `f` = [budget, eps],
       prompt lengths `c` `[B]`), `count = max(n − limit, 0)`, `start = max(min(N_tl, n − 1, n − count), 0)`.
    """
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    b, h = row // H, row % H
    if FROM_NBUF:  # several programs per row: `length` is rewritten below, read the copy
        n = tl.load(nbuf_ptr + row)
    else:
        n = tl.load(len_ptr + b * s_lb + h * s_lh).to(tl.int64)
    if RULE == 0:
        start = tl.load(a_ptr + b * s_ab + h * s_ah).to(tl.int64)
        count = tl.load(c_ptr + b * s_cb + h * s_ch).to(tl.int64)
    elif RULE == 3:
        start, count = _fixed_point_span(n, tl.load(a_ptr + b * s_ab + h * s_ah).to(tl.int64),
                                         tl.load(c_ptr + b * s_cb).to(tl.int64), seen_ptr, f_ptr, m_off)
    else:
        count = (n > tl.load(a_ptr + b * s_ab + h * s_ah)).to(tl.int64)
        start = tl.minimum(n - 1, first)
    _shift_row(
        k_ptr + b * s_kb + h * s_kh, v_ptr + b * s_vb + h * s_vh, p_ptr + b * s_pb + h * s_ph,
        e_ptr + b * s_eb + h * s_eh, sk_ptr + row * s_sr * D, sv_ptr + row * s_sr * D, sp_ptr + row * s_sr,
        se_ptr + row * s_sr, s_kn, s_vn, s_pn, s_en,
        n, start, count, chunk, _per(n, NCHUNK, BLOCK_N), NCHUNK, cap, D,
        HAS_EXTRA, ZERO_EXTRA, SIDE, BLOCK_S, BLOCK_D,
    )
    tl.store(len_ptr + b * s_lb + h * s_lh, n - count, mask=chunk == 0)


@triton.jit
def _fixed_point_layers_kernel(
    k_ptr, v_ptr, p_ptr, len_ptr, a_ptr, off_ptr, c_ptr, f_ptr, seen_ptr,
    ROWS, L, H, cap, D, m_off,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_lb, s_lh, s_ab, s_ah, s_cb,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid `(layers · rows,)`: `_shift_kernel`'s FixedPoint rule, one program per row, for every layer at once;
    layer l's keys, values, positions, lengths, `N_tl` and token count lie `off[i, l]` elements (i = 0..5) from
    layer 0's."""
    pid = tl.program_id(0).to(tl.int64)
    layer, row = pid // ROWS, pid % ROWS
    b, h = row // H, row % H
    k_row = k_ptr + tl.load(off_ptr + layer) + b * s_kb + h * s_kh
    v_row = v_ptr + tl.load(off_ptr + L + layer) + b * s_vb + h * s_vh
    p_row = p_ptr + tl.load(off_ptr + 2 * L + layer) + b * s_pb + h * s_ph
    n_at = len_ptr + tl.load(off_ptr + 3 * L + layer) + b * s_lb + h * s_lh
    n = tl.load(n_at).to(tl.int64)
    ntl = tl.load(a_ptr + tl.load(off_ptr + 4 * L + layer) + b * s_ab + h * s_ah).to(tl.int64)
    seen_at = seen_ptr + tl.load(off_ptr + 5 * L + layer)
    start, count = _fixed_point_span(n, ntl, tl.load(c_ptr + b * s_cb).to(tl.int64), seen_at, f_ptr, m_off)
    _shift_row(k_row, v_row, p_row, p_row, k_row, v_row, p_row, p_row, s_kn, s_vn, s_pn, s_pn,
               n, start, count, 0, _per(n, 1, BLOCK_S), 1, cap, D, False, False, 1, BLOCK_S, BLOCK_D)
    tl.store(n_at, n - count)


# fmt: on


def _check_rows(keys, values, positions, length, extra=None) -> None:
    b, h, cap, d = keys.shape
    if values.shape != keys.shape or positions.shape != (b, h, cap) or length.shape != (b, h):
        raise ValueError(
            f"want keys/values [B, H, cap, D], positions [B, H, cap], length [B, H]; got "
            f"{tuple(keys.shape)}, {tuple(values.shape)}, {tuple(positions.shape)}, {tuple(length.shape)}"
        )
    if keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("keys and values must be contiguous in the head dimension")
    if extra is not None and (extra.shape != (b, h, cap) or extra.dtype != torch.float32):
        raise ValueError(f"extra must be float32 [B, H, cap]; got {extra.dtype} {tuple(extra.shape)}")
    if not runs_triton(keys):
        raise RuntimeError("the Triton rule kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _shift(
    keys, values, positions, length, extra, *, rule, a, c, zero_extra=False, first=0, consts=None,
    seen=None, m_off=0, chunks=None, scratch=None, side=4, config=None,
) -> None:  # fmt: skip
    """Launches the save (several chunks) and the shift for `RULE` (see `_shift_kernel`)."""
    config = config or DEFAULT_CONFIG
    _check_rows(keys, values, positions, length, extra)
    b, h, cap, d = keys.shape
    rows = b * h
    if rows == 0 or cap == 0:
        return
    nchunk = chunks or num_splits(rows, cap, keys.device, config)
    if nchunk > 1 and scratch is None:  # allocated in the caller's stream (a captured graph's private pool)
        scratch = RuleScratch(keys, cap, nchunk, side)
    if scratch is not None:
        scratch.check(keys, nchunk)
        if nchunk > 1 and scratch.side < 1:  # (H2O's scratch) the save launch copies at least one entry a chunk
            raise ValueError("the chunked shift needs a scratch with side >= 1; this one has no side buffers")
        side = scratch.side
        sk, sv, sp, se = scratch.side_k, scratch.side_v, scratch.side_p, scratch.side_e
        nbuf, s_sr = scratch.nbuf, scratch.side_p.stride(0)
    else:  # one program per row: no side buffer, never read
        sk, sv, sp, se, nbuf, s_sr = keys, values, positions, positions, length, 0
    e = extra if extra is not None else positions
    strides = (*keys.stride()[:3], *values.stride()[:3], *positions.stride(), *e.stride(), *length.stride())
    block_d = triton.next_power_of_2(d)
    s_c = (c.stride(0), c.stride(1) if c.dim() > 1 else 0)
    with on_device(keys):
        if nchunk > 1:
            _save_kernel[(rows, nchunk)](
                keys, values, positions, e, length, nbuf, sk, sv, sp, se, h, d, nchunk, s_sr, *strides,
                HAS_EXTRA=extra is not None, SIDE=side, BLOCK_N=config.block_n, BLOCK_D=block_d,
                num_warps=config.num_warps,
            )  # fmt: skip
        _shift_kernel[(rows, nchunk)](
            keys, values, positions, e, length, nbuf, sk, sv, sp, se,
            a, c, consts if consts is not None else length, seen if seen is not None else length,
            h, cap, d, nchunk, s_sr, m_off, first,
            *strides, a.stride(0), a.stride(1), *s_c,
            RULE=rule, FROM_NBUF=nchunk > 1, HAS_EXTRA=extra is not None,
            ZERO_EXTRA=zero_extra, SIDE=side, BLOCK_N=config.block_n,
            BLOCK_S=config.block_s, BLOCK_D=block_d, num_warps=config.shift_warps, enable_fp_fusion=rule != 3,
        )  # fmt: skip


def shift_rows_(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    length: torch.Tensor,
    start: torch.Tensor,
    count: torch.Tensor,
    extra: torch.Tensor | None = None,
    *,
    zero_extra: bool = False,
    chunks: int | None = None,
    scratch: RuleScratch | None = None,
    config: RuleConfig | None = None,
) -> None:
    """Deletes entries `[start[b, h], start[b, h] + count[b, h])` of each row, in place: the later valid entries
    move left (only those: from `start` to the row's old length), and `length -= count`.

    `keys`/`values` `[B, H, cap, D]`, `positions` `[B, H, cap]`, `extra` (optional float32 `[B, H, cap]`, e.g.
    running scores) move together. On the new valid region `[0, length - count)` the result equals
    `CompressedLayer.drop_` (and `_drop_block` for `extra`). Beyond it the slots `[length - count, length)` keep their
    old entries (the last `count`, now also shifted) and the spare room is untouched; with `zero_extra`, `extra` is
    0 from the new length on (freed slots restart at 0). `start + count <= length` is expected (the rules
    guarantee it); a negative `start` counts as 0.

    `chunks`: programs per row (default `num_splits`; 1: no save launch); `scratch`: preallocated buffers (else
    allocated per call when `chunks > 1`, which a CUDA graph captures into its private pool).
    """
    _shift(keys, values, positions, length, extra, rule=0, a=start, c=count, zero_extra=zero_extra, chunks=chunks,
           scratch=scratch, config=config)  # fmt: skip


def drop_oldest_(
    keys, values, positions, length, keep, first: int, *, chunks=None, scratch=None, config: RuleConfig | None = None
) -> None:
    """Rolling (StreamingLLM): deletes entry `min(length - 1, first)` (the oldest after the `first` sinks) from
    each row that holds more than `keep[b, h]` entries; one entry at most, so the chunked shift always applies."""
    _shift(keys, values, positions, length, None, rule=1, a=keep, c=keep, first=first, chunks=chunks, scratch=scratch,
           side=1, config=config)  # fmt: skip


def drop_fixed_point_(
    keys, values, positions, length, n_tl, prompt_lengths, seen, m: int, consts, *, config: RuleConfig | None = None
) -> None:
    """Elastic Cache's fixed-point elimination (FixedPoint.on_token_static): with `limit = ceil(budget · (prompt
    length + seen − m) − eps)` (`consts` = float64 `[budget, eps]`, `seen` the device token count), deletes the
    `excess = length − limit` entries from `min(N_tl, length − 1, length − excess)` on. One program per row:
    `excess` is unbounded but the moved span (from `N_tl` to the end) is short."""
    _shift(keys, values, positions, length, None, rule=3, a=n_tl, c=prompt_lengths, consts=consts, seen=seen, m_off=m,
           chunks=1, config=config)  # fmt: skip


def layer_offsets(*per_layer: list[torch.Tensor]) -> torch.Tensor | None:
    """`[len(per_layer), L]` int64 on the tensors' device: each layer's tensor as an element offset from layer 0's,
    for launches that reach every layer's cache at once (`drop_fixed_point_layers_`); None where the layers'
    tensors of a kind differ in shape, strides, dtype or device, so one set of strides cannot serve them all."""
    rows = []
    for ts in per_layer:
        t0 = ts[0]
        if any(t.shape != t0.shape or t.stride() != t0.stride() or t.dtype != t0.dtype or t.device != t0.device
               for t in ts):  # fmt: skip
            return None
        size = t0.element_size()
        if any((t.data_ptr() - t0.data_ptr()) % size for t in ts):
            return None
        rows.append([(t.data_ptr() - t0.data_ptr()) // size for t in ts])
    if len({ts[0].device for ts in per_layer}) != 1:
        return None
    return torch.tensor(rows, dtype=torch.int64, device=per_layer[0][0].device)


def drop_fixed_point_layers_(
    bases: tuple[torch.Tensor, ...], offsets: torch.Tensor, prompt_lengths, m: int, consts,
    *, config: RuleConfig | None = None,
) -> None:  # fmt: skip
    """`drop_fixed_point_` on every layer in one launch: `bases` are layer 0's keys, values, positions, lengths,
    `N_tl` and token count, `offsets = layer_offsets(...)` of all layers' (made once: the buffers must not move after
    it). What one launch per layer would do, so where nothing reads a layer's cache between its attention and the
    end of the decode step, the deletions can wait for the step's end: the fused step then pays one launch instead
    of one per layer."""
    config = config or DEFAULT_CONFIG
    k0, v0, p0, n0, a0, seen = bases
    _check_rows(k0, v0, p0, n0)
    b, h, cap, d = k0.shape
    layers = offsets.shape[1]
    if offsets.shape[0] != len(bases):
        raise ValueError(f"offsets {tuple(offsets.shape)}: want [{len(bases)}, layers] (layer_offsets of the bases)")
    if b * h == 0 or cap == 0:
        return
    with on_device(k0):
        _fixed_point_layers_kernel[(layers * b * h,)](
            k0, v0, p0, n0, a0, offsets, prompt_lengths, consts, seen, b * h, layers, h, cap, d, m,
            *k0.stride()[:3], *v0.stride()[:3], *p0.stride(), *n0.stride(), *a0.stride(), prompt_lengths.stride(0),
            BLOCK_S=config.block_s, BLOCK_D=triton.next_power_of_2(d), num_warps=config.shift_warps,
            enable_fp_fusion=False,
        )  # fmt: skip


# -- H2O -------------------------------------------------------------------------------------------------------
# fmt: off
@triton.jit
def _logits_pass(
    q_ptr, b, h, scale, s_qb, s_qh, s_qd, k_row, s_kn, lg_row, s_lg, lo, hi, G, D,
    MODE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits `q · k` of keys `[lo, hi)` for the group's query heads (float32, `q` scaled first, as
    `decode_row_scores`), stored to `lg_row` (`[G, ·]`, row stride `s_lg`); returns each head's running max and
    sum of exponentials. `MODE`: `RuleConfig.precision`."""
    gi = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    q_ok = (gi < G)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * s_qb + (h * G + gi)[:, None] * s_qh + d[None, :] * s_qd, mask=q_ok, other=0.0)
    q = q.to(tl.float32) * scale
    if MODE == "split":  # q = q1 + q2 + q3 to float32 precision, each part in the keys' 16-bit type
        kdt = k_row.dtype.element_ty
        q1 = q.to(kdt)
        r = q - q1.to(tl.float32)
        q2 = r.to(kdt)
        q3 = (r - q2.to(tl.float32)).to(kdt)
        if UPCAST:  # interpreter: 16-bit tl.dot is wrong there; the parts are exact in float32
            q1, q2, q3 = q1.to(tl.float32), q2.to(tl.float32), q3.to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_G], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < hi
        kt = tl.load(k_row + j[None, :] * s_kn + d[:, None], mask=ok[None, :] & (d < D)[:, None], other=0.0)
        if MODE == "split":  # products of 16-bit values are exact in float32: three tensor-core dots
            if UPCAST:
                kt = kt.to(tl.float32)
            x = tl.dot(q3, kt, tl.dot(q2, kt, tl.dot(q1, kt)))
        else:
            x = tl.dot(q, kt.to(tl.float32), input_precision=MODE)
        x = tl.where(ok[None, :], x, float("-inf"))
        tl.store(lg_row + gi[:, None] * s_lg + j[None, :], x, mask=(gi < G)[:, None] & ok[None, :])
        m_new = tl.maximum(m, tl.max(x, 1))  # finite: every tile holds a valid key
        sumexp = sumexp * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
    return m, sumexp


@triton.jit
def _h2o_logits_kernel(
    q_ptr, k_ptr, len_ptr, lg_ptr, pm_ptr, pl_ptr,
    H, G, D, NSPLIT, scale, s_qb, s_qh, s_qd, s_kb, s_kh, s_kn, s_lb, s_lh, s_lgr, s_lgg, s_pmr, s_pms,
    MODE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 1, grid `(rows, NSPLIT)`: the split's logits and per-head max and sum of exponentials."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, h = row // H, row % H
    n = tl.load(len_ptr + b * s_lb + h * s_lh).to(tl.int64)
    lo = split * _per(n, NSPLIT, BLOCK_N)
    hi = tl.minimum(lo + _per(n, NSPLIT, BLOCK_N), n)
    m, sumexp = _logits_pass(q_ptr, b, h, scale, s_qb, s_qh, s_qd, k_ptr + b * s_kb + h * s_kh, s_kn,
                             lg_ptr + row * s_lgr, s_lgg, lo, hi, G, D, MODE, UPCAST, BLOCK_G, BLOCK_N, BLOCK_D)
    gi = tl.arange(0, BLOCK_G)
    tl.store(pm_ptr + row * s_pmr + split * s_pms + gi, m, mask=gi < G)
    tl.store(pl_ptr + row * s_pmr + split * s_pms + gi, sumexp, mask=gi < G)


@triton.jit
def _row_lse(lse_ptr, b, h, s_eb, s_eh, G, BLOCK_G: tl.constexpr, LSE_SLOTS: tl.constexpr):
    """The log2-sum-exp2 of each query head's whole attention row, from the attention's per-split values (0 for an
    empty row: its logits are all -inf)."""
    gi = tl.arange(0, BLOCK_G)
    sl = tl.arange(0, LSE_SLOTS)
    x = tl.load(lse_ptr + b * s_eb + (h * G + gi)[:, None] * s_eh + sl[None, :], mask=(gi < G)[:, None],
                other=float("-inf"))
    m = tl.max(x, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(x - m[:, None]), 1)
    return m + tl.log2(tl.where(total > 0.0, total, 1.0))  # padded heads too: no -inf - -inf


@triton.jit
def _select_pass(
    lg_row, s_lg, sc_row, s_sn, p_row, s_pn, M, L, lo, hi, thr, first, G,
    LOG2: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Adds each key's attention (summed over the group) to the running scores of slots `[lo, hi)`; the row's
    softmax is `exp2(x - M)` (`LOG2`: the attention's logits, `M` their log2-sum-exp2) or `exp(x - M) / L`.
    Returns, over these slots, as `(score, position, slot)`, `(position, slot)` and `position`:

    * the lowest-scored candidate, `slot >= first` and `position < thr` (outside the sinks and the recent window),
      the oldest on ties (what `argmin` over the ordered cache picks); +inf and _BIG where none;
    * the oldest entry at `slot >= first` (the victim when no entry is a candidate);
    * the lowest position above `thr` (the next token's recent window starts there).
    """
    # lane-wise running results, reduced once at the end: no cross-thread reduction per tile
    gi = tl.arange(0, BLOCK_G)
    vbest = tl.full([BLOCK_N], float("inf"), tl.float32)
    vbpos = tl.full([BLOCK_N], _BIG, tl.int64)
    vbslot = tl.full([BLOCK_N], _BIG, tl.int64)
    vopos = tl.full([BLOCK_N], _BIG, tl.int64)
    voslot = tl.full([BLOCK_N], _BIG, tl.int64)
    vnxt = tl.full([BLOCK_N], _BIG, tl.int64)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < hi
        x = tl.load(lg_row + gi[:, None] * s_lg + j[None, :], mask=(gi < G)[:, None] & ok[None, :],
                    other=float("-inf"))
        if LOG2:
            p = tl.sum(tl.exp2(x - M[:, None]), 0)
        else:
            p = tl.sum(tl.exp(x - M[:, None]) / L[:, None], 0)
        s = tl.load(sc_row + j * s_sn, mask=ok, other=0.0) + p
        tl.store(sc_row + j * s_sn, s, mask=ok)
        pos = tl.load(p_row + j * s_pn, mask=ok, other=_BIG).to(tl.int64)
        jl = j.to(tl.int64)
        mine = ok & (j >= first)
        cand = mine & (pos < thr)
        better = cand & ((s < vbest) | ((s == vbest) & (pos < vbpos)))
        vbest = tl.where(better, s, vbest)
        vbpos = tl.where(better, pos, vbpos)
        vbslot = tl.where(better, jl, vbslot)
        older = mine & (pos < vopos)
        vopos = tl.where(older, pos, vopos)
        voslot = tl.where(older, jl, voslot)
        vnxt = tl.minimum(vnxt, tl.where(ok & (pos > thr), pos, _BIG))
    best = tl.min(vbest, 0)
    bpos = tl.min(tl.where(vbest == best, vbpos, _BIG), 0)
    bslot = tl.min(tl.where((vbpos == bpos) & (bpos < _BIG), vbslot, _BIG), 0)
    opos = tl.min(vopos, 0)
    oslot = tl.min(tl.where((vopos == opos) & (opos < _BIG), voslot, _BIG), 0)
    nxt = tl.min(vnxt, 0)
    return best, bpos, bslot, opos, oslot, nxt


@triton.jit
def _h2o_finish(
    k_row, v_row, p_row, sc_row, s_kn, s_vn, s_pn, s_sn, len_at, thr_at,
    n, keep, recent, thr, bslot, bpos, oslot, opos, nxt, D, BLOCK_D: tl.constexpr,
):
    """The victim (the candidate, else the oldest entry after the sinks) where the row holds more than `keep`
    entries, replaced by the row's last entry (the new token's, or the victim itself); `length` and the recent
    window's lower bound `thr` for the next token."""
    over = n > keep
    has = bslot < _BIG
    last = n - 1
    victim = tl.where(has, bslot, tl.where(oslot < _BIG, oslot, last))
    vpos = tl.where(has, bpos, opos)
    move = over & (victim != last)
    d = tl.arange(0, BLOCK_D)
    dm = (d < D) & ((d * 0 + move.to(tl.int32)) > 0)  # (a scalar & block mask, as the interpreter takes it)
    tl.store(k_row + victim * s_kn + d, tl.load(k_row + last * s_kn + d, mask=dm), mask=dm)
    tl.store(v_row + victim * s_vn + d, tl.load(v_row + last * s_vn + d, mask=dm), mask=dm)
    tl.store(p_row + victim * s_pn, tl.load(p_row + last * s_pn, mask=move), mask=move)
    tl.store(sc_row + victim * s_sn, tl.load(sc_row + last * s_sn, mask=move), mask=move)
    tl.store(sc_row + last * s_sn, 0.0, mask=over)  # the freed slot restarts at 0
    tl.store(len_at, n - over.to(tl.int64))
    # The window is the `recent` newest entries; the next token enters it and the oldest leaves, unless the
    # window held the whole row (n < recent) or lost an entry to the fallback victim (a protected one).
    up = tl.where(nxt < _BIG, nxt, thr + 1)  # nothing above thr: thr was the new token's position
    hit = over & (vpos >= thr)
    new = tl.where(hit, tl.where(vpos == thr, up, thr), tl.where(n < recent, thr, up))
    tl.store(thr_at, tl.where(recent > 0, new, thr))


@triton.jit
def _h2o_row_kernel(
    q_ptr, k_ptr, v_ptr, p_ptr, sc_ptr, len_ptr, keep_ptr, rec_ptr, thr_ptr, lg_ptr, lse_ptr,
    H, G, D, first, scale,
    s_qb, s_qh, s_qd, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_sb, s_sh, s_sn, s_lb, s_lh,
    s_eb, s_eh, s_rb, s_tb, s_th, s_lgr, s_lgg, s_ab, s_ah,
    FROM_ATTN: tl.constexpr, LSE_SLOTS: tl.constexpr, MODE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The whole update of one row in one program (grid `(rows,)`, rows short enough for one split)."""
    row = tl.program_id(0).to(tl.int64)
    b, h = row // H, row % H
    n = tl.load(len_ptr + b * s_lb + h * s_lh).to(tl.int64)
    lg_row = lg_ptr + row * s_lgr
    sc_row = sc_ptr + b * s_sb + h * s_sh
    k_row, v_row, p_row = k_ptr + b * s_kb + h * s_kh, v_ptr + b * s_vb + h * s_vh, p_ptr + b * s_pb + h * s_ph
    if FROM_ATTN:
        M = _row_lse(lse_ptr, b, h, s_ab, s_ah, G, BLOCK_G, LSE_SLOTS)
        L = M
    else:
        M, L = _logits_pass(q_ptr, b, h, scale, s_qb, s_qh, s_qd, k_row, s_kn, lg_row, s_lgg,
                            0, n, G, D, MODE, UPCAST, BLOCK_G, BLOCK_N, BLOCK_D)
        M = tl.where(M == float("-inf"), 0.0, M)
        L = tl.where(L > 0.0, L, 1.0)
        tl.debug_barrier()  # the logits were stored by other threads
    thr = tl.load(thr_ptr + b * s_tb + h * s_th)
    recent = tl.load(rec_ptr + b * s_rb)
    _, bpos, bslot, opos, oslot, nxt = _select_pass(
        lg_row, s_lgg, sc_row, s_sn, p_row, s_pn, M, L, 0, n, thr, tl.minimum(first, n - 1), G,
        FROM_ATTN, BLOCK_G, BLOCK_N,
    )
    tl.debug_barrier()  # the scores too
    _h2o_finish(k_row, v_row, p_row, sc_row, s_kn, s_vn, s_pn, s_sn, len_ptr + b * s_lb + h * s_lh,
                thr_ptr + b * s_tb + h * s_th, n, tl.load(keep_ptr + b * s_eb + h * s_eh), recent, thr,
                bslot, bpos, oslot, opos, nxt, D, BLOCK_D)


@triton.jit
def _reduce_finish(
    row, k_ptr, v_ptr, p_ptr, sc_ptr, len_ptr, keep_ptr, rec_ptr, thr_ptr, pv_ptr, pi_ptr,
    H, D, NSPLIT, s_pr,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_sb, s_sh, s_sn, s_lb, s_lh, s_eb, s_eh, s_rb, s_tb, s_th,
    PARTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row `row`'s split partials reduced (lowest score, then oldest), then `_h2o_finish`."""
    b, h = row // H, row % H
    sp = tl.arange(0, BLOCK_P)
    ok = sp < NSPLIT
    at = pi_ptr + (row * s_pr + sp) * PARTS
    val = tl.load(pv_ptr + row * s_pr + sp, mask=ok, other=float("inf"))
    bp = tl.load(at, mask=ok, other=_BIG)
    bpos = tl.min(tl.where(val == tl.min(val, 0), bp, _BIG), 0)
    bslot = tl.min(tl.where((bp == bpos) & (bpos < _BIG), tl.load(at + 1, mask=ok, other=_BIG), _BIG), 0)
    op = tl.load(at + 2, mask=ok, other=_BIG)
    opos = tl.min(op, 0)
    oslot = tl.min(tl.where((op == opos) & (opos < _BIG), tl.load(at + 3, mask=ok, other=_BIG), _BIG), 0)
    nxt = tl.min(tl.load(at + 4, mask=ok, other=_BIG), 0)
    n = tl.load(len_ptr + b * s_lb + h * s_lh).to(tl.int64)
    thr = tl.load(thr_ptr + b * s_tb + h * s_th)
    _h2o_finish(k_ptr + b * s_kb + h * s_kh, v_ptr + b * s_vb + h * s_vh, p_ptr + b * s_pb + h * s_ph,
                sc_ptr + b * s_sb + h * s_sh, s_kn, s_vn, s_pn, s_sn, len_ptr + b * s_lb + h * s_lh,
                thr_ptr + b * s_tb + h * s_th, n, tl.load(keep_ptr + b * s_eb + h * s_eh), tl.load(rec_ptr + b * s_rb),
                thr, bslot, bpos, oslot, opos, nxt, D, BLOCK_D)


@triton.jit
def _h2o_select_kernel(
    k_ptr, v_ptr, p_ptr, sc_ptr, len_ptr, keep_ptr, rec_ptr, thr_ptr, lg_ptr, pm_ptr, pl_ptr, lse_ptr, pv_ptr, pi_ptr,
    cnt_ptr, H, G, D, NSPLIT, first, s_pr,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_sb, s_sh, s_sn, s_lb, s_lh, s_eb, s_eh, s_rb, s_tb, s_th,
    s_lgr, s_lgg, s_pmr, s_pms, s_ab, s_ah,
    FROM_ATTN: tl.constexpr, LSE_SLOTS: tl.constexpr, FINISH: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid `(rows, NSPLIT)`: the row's softmax normaliser (from the attention's log2-sum-exp2s or the logits
    launch's partials), the split's scores updated, and its `_select_pass` results (partials `pv` float32
    `[rows, NSPLIT]`, `pi` int64 `[rows, NSPLIT, PARTS]`: best position, best slot, oldest position, its slot, next).
    `FINISH`: the row's last split to get here (a per-row counter `cnt`, reset after) also does `_reduce_finish`;
    else `_h2o_finish_kernel` does, in a launch of its own."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b, h = row // H, row % H
    n = tl.load(len_ptr + b * s_lb + h * s_lh).to(tl.int64)
    per = _per(n, NSPLIT, BLOCK_N)
    lo = split * per
    hi = tl.minimum(lo + per, n)
    if FROM_ATTN:
        M = _row_lse(lse_ptr, b, h, s_ab, s_ah, G, BLOCK_G, LSE_SLOTS)
        L = M
    else:
        sp = tl.arange(0, BLOCK_P)
        gi = tl.arange(0, BLOCK_G)
        off = row * s_pmr + sp[:, None] * s_pms + gi[None, :]
        ok = (sp < NSPLIT)[:, None] & (gi < G)[None, :]
        pm = tl.load(pm_ptr + off, mask=ok, other=float("-inf"))
        pl = tl.load(pl_ptr + off, mask=ok, other=0.0)
        M = tl.max(pm, 0)
        M = tl.where(M == float("-inf"), 0.0, M)  # padded heads, empty rows: no NaN from -inf - -inf
        L = tl.sum(pl * tl.exp(pm - M[None, :]), 0)
        L = tl.where(L > 0.0, L, 1.0)
    thr = tl.load(thr_ptr + b * s_tb + h * s_th)
    best, bpos, bslot, opos, oslot, nxt = _select_pass(
        lg_ptr + row * s_lgr, s_lgg, sc_ptr + b * s_sb + h * s_sh, s_sn, p_ptr + b * s_pb + h * s_ph, s_pn, M, L,
        lo, hi, thr, tl.minimum(first, n - 1), G, FROM_ATTN, BLOCK_G, BLOCK_N,
    )
    tl.store(pv_ptr + row * s_pr + split, best)
    at = pi_ptr + (row * s_pr + split) * PARTS
    tl.store(at, bpos)
    tl.store(at + 1, bslot)
    tl.store(at + 2, opos)
    tl.store(at + 3, oslot)
    tl.store(at + 4, nxt)
    if FINISH:
        # every thread's stores before the counter (the barrier), which is acq_rel: the last split sees the others'
        # (the barrier cost nothing measurable: 0.365 / 0.325 / 0.377 ms at (1, 128K) / (4, 32K) / (64, 2K) against
        # 0.382 / 0.333 / 0.377, bench_rules.py --with-attention, results/bench/rules_h2o_attn_barrier_h200.json)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + row, 1) == NSPLIT - 1:
            tl.store(cnt_ptr + row, 0)
            _reduce_finish(row, k_ptr, v_ptr, p_ptr, sc_ptr, len_ptr, keep_ptr, rec_ptr, thr_ptr, pv_ptr, pi_ptr,
                           H, D, NSPLIT, s_pr, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_sb, s_sh,
                           s_sn, s_lb, s_lh, s_eb, s_eh, s_rb, s_tb, s_th, PARTS, BLOCK_P, BLOCK_D)


@triton.jit
def _h2o_finish_kernel(
    k_ptr, v_ptr, p_ptr, sc_ptr, len_ptr, keep_ptr, rec_ptr, thr_ptr, pv_ptr, pi_ptr,
    H, D, NSPLIT, s_pr,
    s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_sb, s_sh, s_sn, s_lb, s_lh, s_eb, s_eh, s_rb, s_tb, s_th,
    PARTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid `(rows,)`: `_reduce_finish` per row."""
    _reduce_finish(tl.program_id(0).to(tl.int64), k_ptr, v_ptr, p_ptr, sc_ptr, len_ptr, keep_ptr, rec_ptr, thr_ptr,
                   pv_ptr, pi_ptr, H, D, NSPLIT, s_pr, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_pb, s_ph, s_pn, s_sb,
                   s_sh, s_sn, s_lb, s_lh, s_eb, s_eh, s_rb, s_tb, s_th, PARTS, BLOCK_P, BLOCK_D)


# fmt: on


def h2o_window(positions: torch.Tensor, length: torch.Tensor, recent: torch.Tensor, next_position: int) -> torch.Tensor:
    """`[B, H]` int64: where `h2o_step_`'s recent window starts at the next token, for a cache in position order
    (right after compression): the `recent[b]`-th newest of each row's entries and the next token's position
    (the window holds the whole row where it has fewer; `recent` 0: none, a bound above every position)."""
    b, h, _ = positions.shape
    ext = torch.cat([positions, positions.new_zeros(b, h, 1)], -1)
    ext.scatter_(-1, length[..., None], next_position)
    r = recent.reshape(b, 1).to(length.device)
    start = ext.gather(-1, (length + 1 - r).clamp(min=0)[..., None])[..., 0]
    return torch.where(r > 0, start, 2**62).long()


def h2o_step_(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    length: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    recent: torch.Tensor,
    window: torch.Tensor,
    first: int,
    scratch: RuleScratch,
    *,
    from_attention: int = 0,
    splits: int | None = None,
    config: RuleConfig | None = None,
) -> None:
    """H2O's per-token update (Zhang et al., NeurIPS 2023, Algorithm 1; `H2O.on_token_static`), in place, with the
    cache's entries in any order: each entry is found by its position, not its slot.

    The decode query's attention over each row's valid entries (`query` `[B, Hq, 1, D]`, softmax per query head,
    summed over the `Hq / H` heads of the KV head) is added to `scores` (`[B, H, cap]` float32). Where a row holds
    more than `keep[b, h]` entries, its victim is the lowest-scored candidate (`slot >= first`, outside the sinks,
    and position below `window[b, h]`, outside the `recent[b]` newest entries; the oldest on ties), or where there
    is none the oldest entry after the sinks: the row's last entry (the new token's) takes the victim's slot and
    score, and `length` drops by one. So nothing shifts: the update reads each valid entry's logit, score and
    position once and moves one entry, against half of a row's keys and values a step when entries keep their
    order. `window` advances with the row (start it with `h2o_window`). On the ordered cache this is the victim
    the PyTorch form (`decode_rules.H2O`) picks; the entries left are the same, at other slots.

    `from_attention`: the logits are in `scratch.logits` already, from the attention itself
    (`rope_append_attention(logits=(scratch.logits, scratch.lse))`, log2 domain): no pass over the keys. Else a
    first launch computes them (float32, `q` scaled first, as `decode_row_scores`).

    One launch per layer where a row fits one split (`_h2o_row_kernel`), else two or three over `(rows, splits)`:
    the logits with partial softmax statistics, the scores with partial selections, and per row the victim.
    """
    _check_rows(keys, values, positions, length, scores)
    config = config or DEFAULT_CONFIG
    b, h, cap, d = keys.shape
    hq = query.shape[1]
    if query.dim() != 4 or query.shape[0] != b or query.shape[-1] != d or hq % h:
        raise ValueError(f"query must be [B, Hq, 1, D] for keys {tuple(keys.shape)}; got {tuple(query.shape)}")
    if recent.dim() == 0 or recent.shape[0] != b:
        raise ValueError(f"recent must be [B, ...] with B = {b}; got {tuple(recent.shape)}")
    if window.shape != (b, h) or window.dtype != torch.long:
        raise ValueError(f"window must be int64 [B, H] = [{b}, {h}]; got {window.dtype} {tuple(window.shape)}")
    group, rows = hq // h, b * h
    if rows == 0 or cap == 0:
        return
    nsplit = splits or num_splits(rows, cap, keys.device, config)
    scratch.check(keys, nsplit, group)
    if config.block_n < 16:
        raise ValueError("H2O needs block_n >= 16 (tl.dot)")
    mode = config.precision
    if mode == "auto" or (mode == "split" and keys.element_size() > 2):
        mode = "split" if keys.element_size() == 2 else "ieee"
    prec = dict(MODE=mode, UPCAST=interpreting())
    # float32 FMA dots of 64 float32 keys spill registers on sm_90 (ptxas): 32 there
    block_n = min(config.block_n, 32) if mode == "ieee" else config.block_n
    blocks = dict(BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n)  # 16: tl.dot's least M
    small_g = max(2, triton.next_power_of_2(group))  # without the logits pass: no tl.dot, no padded heads
    sel_n = config.select_block_n
    block_d = max(16, triton.next_power_of_2(d))
    s_q = (query.stride(0), query.stride(1), query.stride(3))
    lg, lse = scratch.logits, scratch.lse
    attn = dict(FROM_ATTN=bool(from_attention), LSE_SLOTS=lse.shape[2])
    rec = recent.reshape(b)
    kvp = (*keys.stride()[:3], *values.stride()[:3], *positions.stride(), *scores.stride(), *length.stride())
    s_lg, s_lse = (lg.stride(0), lg.stride(1)), (lse.stride(0), lse.stride(1))
    with on_device(keys):
        if nsplit == 1:
            _h2o_row_kernel[(rows,)](
                query, keys, values, positions, scores, length, keep, rec, window, lg, lse, h, group, d, first,
                d**-0.5, *s_q, *kvp, *keep.stride(), rec.stride(0), *window.stride(), *s_lg, *s_lse,
                **attn, **prec, **(dict(BLOCK_G=small_g, BLOCK_N=sel_n) if from_attention else blocks), BLOCK_D=block_d,
                num_warps=config.num_warps,
            )  # fmt: skip
            return
        pm, pl, pv, pi = scratch.part_m, scratch.part_l, scratch.part_v, scratch.part_i
        if not from_attention:
            _h2o_logits_kernel[(rows, nsplit)](
                query, keys, length, lg, pm, pl, h, group, d, nsplit, d**-0.5, *s_q, *keys.stride()[:3],
                *length.stride(), *s_lg, pm.stride(0), pm.stride(1), **prec, **blocks, BLOCK_D=block_d,
                num_warps=config.num_warps,
            )  # fmt: skip
        fin = dict(PARTS=_PARTS, BLOCK_P=max(2, triton.next_power_of_2(nsplit)), BLOCK_D=block_d)
        rest = (*kvp, *keep.stride(), rec.stride(0), *window.stride())
        fused = config.h2o_finish == "fused"
        _h2o_select_kernel[(rows, nsplit)](
            keys, values, positions, scores, length, keep, rec, window, lg, pm, pl, lse, pv, pi, scratch.count, h,
            group, d, nsplit, first, pv.stride(0), *rest, *s_lg, pm.stride(0), pm.stride(1), *s_lse, **attn,
            FINISH=fused, BLOCK_G=small_g, BLOCK_N=sel_n, **fin,
            num_warps=config.num_warps,
        )  # fmt: skip
        if not fused:
            _h2o_finish_kernel[(rows,)](
                keys, values, positions, scores, length, keep, rec, window, pv, pi, h, d, nsplit, pv.stride(0), *rest,
                **fin, num_warps=1,
            )  # fmt: skip
