"""The decode step's projections as one Triton launch each: ``x @ W.T (+ bias)`` for up to 64 rows.

At one token per sequence a projection reads its whole weight matrix for a few rows of input: a memory-bound
matrix-vector product. cuBLAS reads the 7B model's large MLP weights near the copy bandwidth, but its output and
down projections (34 and 117 MB) through split-K and a separate reduction launch. Here one program owns
``block_n`` output columns for a tile of rows (16, or 64 for 17-64 rows) and streams its weight rows once along K,
``num_stages`` tiles in flight. On an H200 (experiments/linear_sweep.py, results/bench/linear_sweep_h200.json)
at batch 1-16 that takes the output projection from 13.5-13.8 to 11.4-11.8 µs and the down projection from
32.1-33.0 to 30.3-30.7 µs; in a later run (`--shapes swiglu,qkv`, results/bench/linear_sweep_swiglu_qkv_h200.json)
q/k/v (`QKV_CONFIG`) from 15.6-16.0 to 14.9-15.1 µs. For gate/up alone cuBLAS is about as fast, but
`swiglu_linear` also applies SwiGLU in its epilogue, so the step loses `silu_mul`'s launch: 57.2-57.7 against
58.9-59.9 µs for cuBLAS then `silu_mul`, with equal outputs. Deeper pipelines (6-8 stages) and 16-column tiles
(`--deep --shapes o,qkv`, results/bench/linear_sweep_deep_h200.json) moved the output and q/k/v projections by
0.3 µs at most, so the configurations stay. A draft that instead folded the RMSNorm or SwiGLU into the load of the
input (not kept) was slower: each tile's extra arithmetic stalled the load pipeline; the epilogue runs once per
program.

At 17-64 rows (`LinearConfig.wide`) a 64-row tile makes the input tile as large as the weights', so each program
re-reads the whole input from L2: few, 64-column programs, and for the output and down projections (64 column tiles)
K split between two programs per tile (``split_k``) so the GPU fills. Each slice's float32 sums go to a workspace
and a per-tile counter elects the last program to arrive, which adds the slices in slice order (the same bits
whoever finishes first) and runs the epilogue, so the norms below stay fused. At batch 64 on an H200 (`--wide
--batches 64`, results/bench/linear_sweep_wide64_h200.json, then `--wide-deep`, linear_sweep_wide_deep64_h200.json):
down 35.6 → 32.8 µs, gate/up with SwiGLU 64.0 → 60.4 µs (cuBLAS then `silu_mul`), output and q/k/v within 0.2 µs of
cuBLAS (12.8 against 12.6, 16.2 against 16.1), which they keep for the norm folded into their epilogues; split
across 4 programs, or 128-column tiles, were slower everywhere. In the decode step (experiments/step_forms_ab.py,
results/bench/step_forms_ab_wide_h200.json, one run) that took (64, 2K) from 5.079 to 4.832 ms a token at budget 0.1
and from 7.917 to 7.677 with the full cache; there gate/up was faster with 64 of K per step than with 128 (4.870
ms), unlike alone. Loading the tiles through tensor descriptors (the copy engine; a draft, not kept) moved every
projection by 0.5 µs or less either way at batch 1, 4 and 64 (linear_sweep_wide_tma64_h200.json,
linear_sweep_tma_narrow_h200.json).

So the decode step's RMSNorms go to epilogues (`residual_norm_linear`, `normed_linear`): the output and down
projections add the residual and write ``h``, ``h · w_norm`` and their columns' partial sums of ``h²``; q/k/v and
gate/up scale their sums by each row's ``1 / rms`` from those partials. Two launches fewer per layer: 0.077-0.086 ms
off a step at batch 1 and 4, budget 0.1 (experiments/step_forms_ab.py, results/bench/step_forms_ab_norm_h200.json);
the same fold in the consumer's loads made it 1.1 ms slower (step_forms_ab_normloop_h200.json). Loading the norm
operands (the partial sums; the residual and the norm weight) before the K loop rather than in the epilogue, to
overlap their latency with the weight stream, was slower too: 4.007 → 4.090 ms at batch 1, 2K prompt, budget 0.1,
4.421 → 4.497 at 128K (results/bench/step_forms_ab_early_h200.json, a draft's `LinearConfig.early_loads`, not kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fused_ops import rms_norm, silu_mul
from .launch import interpreting

__all__ = [
    "QKV_CONFIG",
    "SWIGLU_CONFIG",
    "LinearConfig",
    "Normed",
    "decode_linear",
    "normed_linear",
    "residual_norm_linear",
    "supported",
    "swiglu_linear",
]

MAX_ROWS = 16  # the narrow tier's row tile
MAX_ROWS_WIDE = 64  # the wide tier's row tile (17-64 rows); beyond it cuBLAS


@dataclass
class LinearConfig:
    """Launch parameters: ``block_n`` output columns per program (the tile's M axis), ``block_k`` of the input
    per step (halved until it divides K; below 16 the PyTorch form runs), ``split_k`` programs per column tile,
    each over its own slice of K (the last to finish adds the slices in a fixed order and runs the epilogue).
    ``wide``: the parameters used instead for more than `MAX_ROWS` rows (None: these)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 5
    split_k: int = 1
    wide: LinearConfig | None = None


# the output and down projections' best on an H200 at batch 1-16, and at 64 (`wide`: linear_sweep.py --wide)
DEFAULT_CONFIG = LinearConfig(wide=LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=5, split_k=2))
QKV_CONFIG = LinearConfig(block_n=64, block_k=128, num_stages=5,  # the fused q/k/v projection's
                          wide=LinearConfig(block_n=64, block_k=128, num_warps=4, num_stages=5))
SWIGLU_CONFIG = LinearConfig(block_n=64, block_k=128, num_stages=3,  # swiglu_linear's (two weight tiles a step)
                             wide=LinearConfig(block_n=64, block_k=64, num_warps=4, num_stages=4))


@triton.jit
def _epilogue(
    acc, acc_up, rows, r_ok, cols, c_ok, b_ptr, o_ptr, N, K, s_o, r_ptr, g_ptr, h_ptr, sq_ptr, NPART, eps, s_r, s_h,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, PRE_NORM: tl.constexpr, EPI_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One column tile's output from its float32 sums ``acc`` ``[BLOCK_N, BLOCK_M]`` (transposed)."""
    ty = o_ptr.dtype.element_ty
    if PRE_NORM:  # x is h · g: RMSNorm's 1 / sqrt(mean(h²) + eps) per row, from the producer's partial sums
        p = tl.arange(0, BLOCK_P)
        part = tl.load(sq_ptr + p[:, None] * BLOCK_M + rows[None, :], mask=(p < NPART)[:, None], other=0.0)
        inv = tl.math.rsqrt(tl.sum(part, 0) / K + eps)
        acc = acc * inv[None, :]
        acc_up = acc_up * inv[None, :]
    if HAS_BIAS:  # in float32 before the one rounding, as addmm
        acc += tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        if SWIGLU:
            acc_up += tl.load(b_ptr + N + cols, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if SWIGLU:  # fused_ops.silu_mul on the rounded projections, op for op
        g = acc.to(ty).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
        acc = a * acc_up.to(ty).to(tl.float32)
    ok = c_ok[:, None] & r_ok[None, :]
    if EPI_NORM:  # the residual stream h = r + this output, and the next RMSNorm's input: h · g, partial sums of h²
        r = tl.load(r_ptr + rows[None, :] * s_r + cols[:, None], mask=ok, other=0.0)
        h = (acc.to(ty).to(tl.float32) + r.to(tl.float32)).to(ty)
        tl.store(h_ptr + rows[None, :] * s_h + cols[:, None], h, mask=ok)
        hf = tl.where(ok, h.to(tl.float32), 0.0)
        tl.store(sq_ptr + tl.program_id(0) * BLOCK_M + rows, tl.sum(hf * hf, 0))
        acc = hf * tl.load(g_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(o_ptr + rows[None, :] * s_o + cols[:, None], acc.to(ty), mask=ok)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, B, N, K, s_x, s_w, s_o,
    r_ptr, g_ptr, h_ptr, sq_ptr, NPART, eps, s_r, s_h, ws_ptr, cnt_ptr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SWIGLU: tl.constexpr,
    PRE_NORM: tl.constexpr, EPI_NORM: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid ``(column tiles, SPLIT_K)``: program ``(t, s)`` sums ``w @ x.T`` over K's slice ``s`` for the columns
    of tile ``t``; with ``SPLIT_K`` 1 it runs the epilogue itself."""
    rows = tl.arange(0, BLOCK_M)
    r_ok = rows < B
    tile = tl.program_id(0)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # the output transposed: the weights are the wide operand
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # SWIGLU: the up projection's columns, rows N + cols of w
    k_len = K // SPLIT_K  # whole BLOCK_Ks (the host's choice of block_k)
    k_lo = tl.program_id(1) * k_len
    for k0 in range(k_lo, k_lo + k_len, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[None, :] * s_x + kk[:, None], mask=r_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * s_w + kk[None, :], mask=c_ok[:, None], other=0.0)
        if UPCAST:  # interpreter: 16-bit tl.dot is wrong there
            w, x = w.to(tl.float32), x.to(tl.float32)
        if IEEE:
            acc = tl.dot(w, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
        if SWIGLU:
            wu = tl.load(w_ptr + (N + cols[:, None]).to(tl.int64) * s_w + kk[None, :], mask=c_ok[:, None], other=0.0)
            if UPCAST:
                wu = wu.to(tl.float32)
            if IEEE:
                acc_up = tl.dot(wu, x, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(wu, x, acc_up)
    if SPLIT_K == 1:
        _epilogue(acc, acc_up, rows, r_ok, cols, c_ok, b_ptr, o_ptr, N, K, s_o, r_ptr, g_ptr, h_ptr, sq_ptr, NPART,
                  eps, s_r, s_h, HAS_BIAS, SWIGLU, PRE_NORM, EPI_NORM, BLOCK_M, BLOCK_P)
    else:
        # the slices' sums through a workspace: the tile's last program to arrive (a counter per tile) adds them in
        # slice order, so the result does not depend on which finished first, and runs the epilogue
        at = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + rows[None, :]
        size = BLOCK_N * BLOCK_M * (2 if SWIGLU else 1)
        tl.store(ws_ptr + (tile * SPLIT_K + tl.program_id(1)) * size + at, acc)
        if SWIGLU:
            tl.store(ws_ptr + (tile * SPLIT_K + tl.program_id(1)) * size + BLOCK_N * BLOCK_M + at, acc_up)
        tl.debug_barrier()  # every thread's stores before the counter, which is acq_rel
        if tl.atomic_add(cnt_ptr + tile, 1) == SPLIT_K - 1:
            tl.store(cnt_ptr + tile, 0)  # back at 0 for the next launch
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for s in tl.static_range(SPLIT_K):  # .cg: the other programs' stores are in L2, not this SM's L1
                acc += tl.load(ws_ptr + (tile * SPLIT_K + s) * size + at, cache_modifier=".cg")
                if SWIGLU:
                    acc_up += tl.load(ws_ptr + (tile * SPLIT_K + s) * size + BLOCK_N * BLOCK_M + at,
                                      cache_modifier=".cg")
            _epilogue(acc, acc_up, rows, r_ok, cols, c_ok, b_ptr, o_ptr, N, K, s_o, r_ptr, g_ptr, h_ptr, sq_ptr,
                      NPART, eps, s_r, s_h, HAS_BIAS, SWIGLU, PRE_NORM, EPI_NORM, BLOCK_M, BLOCK_P)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Per-tile arrival counters for split-K launches, zero between launches (each launch's last programs reset
    theirs), shared by the launches of one device: they must not run concurrently (one stream, as the decode
    step). Allocated once, before any CUDA-graph capture that uses them (the step's eager warm-up)."""
    cnt = _COUNTERS.get(device)
    if cnt is None or cnt.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # made inside a capture they would live in the graph's pool, freed with it, then reused by others
            raise RuntimeError("split-K counters allocated inside a CUDA-graph capture: run the launch once first")
        if cnt is not None:  # a captured graph may still use the smaller buffer: kept alive
            _OUTGROWN.append(cnt)
        cnt = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return cnt


_OUTGROWN: list[torch.Tensor] = []


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton form runs: at most `MAX_ROWS_WIDE` rows, CUDA 16-bit weights (float32 keeps cuBLAS), or
    CPU tensors under the interpreter."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS_WIDE:
        return False
    if interpreting() and x.device.type == "cpu":
        return True
    return x.is_cuda and w.dtype in (torch.float16, torch.bfloat16) and x.dtype == w.dtype


def _plan(rows: int, k: int, config: LinearConfig | None) -> tuple[LinearConfig, int, int, int] | None:
    """(config, rows' tile, block_k, split_k) for `rows` rows and K = `k`, or None where no block of 16 or more
    divides K's slices. Beyond `MAX_ROWS` rows the config's `wide` applies where it has one."""
    cfg = config or DEFAULT_CONFIG
    if rows > MAX_ROWS and cfg.wide is not None:
        cfg = cfg.wide
    tile = MAX_ROWS if rows <= MAX_ROWS else MAX_ROWS_WIDE
    for split in dict.fromkeys((cfg.split_k, 1)):
        block_k = cfg.block_k
        while block_k >= 16 and k % (block_k * split):  # whole blocks in each slice: no masks in the K loop
            block_k //= 2
        if block_k >= 16:
            return cfg, tile, block_k, split
    return None


def _launch(x, w, bias, n_out, swiglu, config, pre=None, epi=None):
    """The Triton form, or None where it does not run (see `supported`). `pre`: a `Normed` input (`x` is ``h · g``,
    scaled by its rows' ``1 / rms`` in the epilogue); `epi`: ``(residual, g, h, sq)``, the epilogue's outputs."""
    B, K = x.shape
    plan = _plan(B, K, config)
    if plan is None or not supported(x, w) or x.stride(-1) != 1 or w.stride(-1) != 1:
        return None
    cfg, rows, block_k, split = plan
    grid = triton.cdiv(n_out, cfg.block_n)
    if epi is not None:
        r, g, h, sq = epi
    else:  # pointers the kernel does not touch, but for the partial sums a normed input reads
        r, g, h, sq = x, w, x, pre.sq if pre is not None else x
    if (pre is not None or epi is not None) and sq.shape[1] != rows:
        raise ValueError(f"partial sums {tuple(sq.shape)}: want {rows} columns for {B} rows")
    npart, eps = (sq.shape[0], pre.eps) if pre is not None else (grid, 0.0)
    out = torch.empty(B, n_out, dtype=x.dtype, device=x.device)
    if split > 1:
        ws = torch.empty(grid * split * (2 if swiglu else 1) * cfg.block_n * rows, dtype=torch.float32,
                         device=x.device)  # fmt: skip
        cnt = _counters(x.device, grid)
    else:
        ws = cnt = out  # untouched
    _linear_kernel[(grid, split)](
        x, w, bias if bias is not None else w, out, B, n_out, K, x.stride(0), w.stride(0), out.stride(0),
        r, g, h, sq, npart, float(eps), r.stride(0), h.stride(0), ws, cnt,
        HAS_BIAS=bias is not None, UPCAST=x.device.type == "cpu", IEEE=x.dtype == torch.float32, SWIGLU=swiglu,
        PRE_NORM=pre is not None, EPI_NORM=epi is not None, SPLIT_K=split,
        BLOCK_M=rows, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        BLOCK_P=triton.next_power_of_2(npart) if pre is not None else 1,  # else unused: no specialisation per N
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _check(x: torch.Tensor, w: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")


def decode_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, config: LinearConfig | None = None
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for ``x`` ``[B, K]``, ``w`` ``[N, K]``: the Triton form where `supported`, else
    ``F.linear`` itself."""
    _check(x, w, "decode_linear")
    out = _launch(x, w, bias, w.shape[0], False, config)
    return F.linear(x, w, bias) if out is None else out


def swiglu_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, config: LinearConfig | None = None
) -> torch.Tensor:
    """``silu_mul(F.linear(x, w, bias))`` for the gate and up projections stacked in ``w`` ``[2I, K]`` (gate rows
    first): ``silu(x Wg^T) · (x Wu^T)``, ``[B, I]``, the SwiGLU MLP's input to its down projection (Shazeer 2020,
    eq. 6). The Triton form computes a program's gate and up columns side by side and applies SwiGLU to the rounded
    projections in its epilogue, as `fused_ops.silu_mul` does, so no separate launch reads them back."""
    _check(x, w, "swiglu_linear")
    if w.shape[0] % 2:
        raise ValueError(f"swiglu_linear: w must stack gate and up rows, [2I, K]; got {tuple(w.shape)}")
    out = _launch(x, w, bias, w.shape[0] // 2, True, config)
    return silu_mul(F.linear(x, w, bias)) if out is None else out


@dataclass
class Normed:
    """A projection's input that went through RMSNorm (Zhang & Sennrich 2019, eq. 4): either ``x`` = the normed rows
    themselves (``sq`` None), or, from `residual_norm_linear`'s Triton form, ``x = h · g`` and ``sq``
    ``[P, rows' tile]``, per-program partial sums of ``h²``, whose total over ``P`` gives each row's
    ``1 / sqrt(mean(h²) + eps)``."""

    x: torch.Tensor
    sq: torch.Tensor | None
    eps: float


def residual_norm_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    norm_w: torch.Tensor,
    eps: float,
    *,
    config: LinearConfig | None = None,
) -> tuple[torch.Tensor, Normed]:
    """A projection, the residual add after it, and the next RMSNorm: ``h = residual + F.linear(x, w, bias)``,
    ``(h, RMSNorm(h) · norm_w)``, what `decode_linear` then `fused_ops.rms_norm` compute, in one launch.

    The norm needs a whole row of ``h`` and a program owns a few columns, so it is split at
    ``(h · s · g) W^T = s · ((h · g) W^T)`` (``s = 1 / sqrt(mean(h²) + eps)`` per row): this epilogue writes ``h``,
    ``h · g`` and its columns' sum of ``h²``; `normed_linear` scales its sums by ``s`` in its own epilogue. The
    normed input is then rounded as ``h · g`` where `rms_norm` rounds ``h · s``, then ``g ·`` that: equal to the
    16-bit type's rounding (tests/test_linear.py against float64); ``h`` is bit for bit `rms_norm`'s. Where the
    Triton form does not run (see `supported`), the two launches."""
    _check(x, w, "residual_norm_linear")
    n = w.shape[0]
    if residual.shape != (x.shape[0], n) or norm_w.shape != (n,):
        raise ValueError(
            f"residual_norm_linear: residual {tuple(residual.shape)} and norm_w {tuple(norm_w.shape)} must be "
            f"[{x.shape[0]}, {n}] and [{n}], the projection's output"
        )
    plan = _plan(x.shape[0], x.shape[1], config)
    # n is the normed rows' K in normed_linear: whole 16s there
    if plan and residual.stride(-1) == 1 and residual.dtype == x.dtype and n % 16 == 0 and supported(x, w):
        cfg, rows = plan[0], plan[1]
        h = torch.empty_like(residual)
        sq = torch.empty(triton.cdiv(n, cfg.block_n), rows, dtype=torch.float32, device=x.device)
        out = _launch(x, w, bias, n, False, cfg, epi=(residual, norm_w, h, sq))
        if out is not None:
            return h, Normed(out, sq, eps)
    h, y = rms_norm(residual, norm_w, eps, residual=decode_linear(x, w, bias, config=config))
    return h, Normed(y, None, eps)


def normed_linear(
    x: Normed, w: torch.Tensor, bias: torch.Tensor | None = None, *, swiglu: bool = False, config=None
) -> torch.Tensor:
    """`decode_linear` (or with ``swiglu`` `swiglu_linear`) of a `Normed` input: of its rows themselves, or, from
    `residual_norm_linear`'s Triton form, of ``h · g`` with each row's sums scaled by its ``1 / rms`` before the
    bias and SwiGLU."""
    if x.sq is None:
        return (swiglu_linear if swiglu else decode_linear)(x.x, w, bias, config=config)
    _check(x.x, w, "normed_linear")
    if swiglu and w.shape[0] % 2:
        raise ValueError(f"normed_linear: swiglu wants w stacking gate and up rows, [2I, K]; got {tuple(w.shape)}")
    out = _launch(x.x, w, bias, w.shape[0] // 2 if swiglu else w.shape[0], swiglu, config, pre=x)
    if out is None:  # residual_norm_linear made partial sums, so its Triton form ran for these rows and dtype
        raise ValueError(f"normed_linear: partial sums given, but the Triton form does not run for w {w.dtype} "
                         f"{tuple(w.shape)} on {w.device} (see `supported`)")  # fmt: skip
    return out
