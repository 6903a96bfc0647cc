"""The decode step's smaller projections as one Triton launch each: ``x @ W.T (+ bias)`` for a few rows.

At one token per sequence a projection reads its whole weight matrix for a few rows of input: a memory-bound
matrix-vector product. cuBLAS reads the 7B model's large MLP weights near the copy bandwidth, but its output and
down projections (34 and 117 MB) through split-K and a separate reduction launch. Here one program owns
``block_n`` output columns for up to 16 rows and streams its weight rows once along K, ``num_stages`` tiles in
flight: no split, no second launch. On an H200 (experiments/linear_sweep.py, results/bench/linear_sweep_h200.json)
at batch 1-16 that takes the output projection from 13.5-13.8 to 11.4-11.8 µs and the down projection from
32.1-33.0 to 30.3-30.7 µs; in a later run (`--shapes swiglu,qkv`, results/bench/linear_sweep_swiglu_qkv_h200.json)
q/k/v (`QKV_CONFIG`) from 15.6-16.0 to 14.9-15.1 µs. For gate/up alone cuBLAS is about as fast, but
`swiglu_linear` also applies SwiGLU in its epilogue, so the step loses `silu_mul`'s launch: 57.2-57.7 against
58.9-59.9 µs for cuBLAS then `silu_mul`, with equal outputs. Deeper pipelines (6-8 stages) and 16-column tiles
(`--deep --shapes o,qkv`, results/bench/linear_sweep_deep_h200.json) moved the output and q/k/v projections by
0.3 µs at most, so the configurations stay. At batch 64 (a 64-row-tile draft, not kept) cuBLAS was
faster for all four. A draft that instead folded the RMSNorm or SwiGLU into the load of the input (not kept) was
slower: each tile's extra arithmetic stalled the load pipeline; the epilogue runs once per program.

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

MAX_ROWS = 16  # one tile of rows: beyond it cuBLAS is the better choice (and the weights would be read twice)


@dataclass
class LinearConfig:
    """Launch parameters: ``block_n`` output columns per program (the tile's M axis), ``block_k`` of the input
    per step (halved until it divides K; below 16 the PyTorch form runs)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 5


DEFAULT_CONFIG = LinearConfig()  # the output and down projections' best on an H200 at batch 1-16
QKV_CONFIG = LinearConfig(block_n=64, block_k=128, num_stages=5)  # the fused q/k/v projection's
SWIGLU_CONFIG = LinearConfig(block_n=64, block_k=128, num_stages=3)  # swiglu_linear's (two weight tiles a step)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, B, N, K, s_x, s_w, s_o,
    r_ptr, g_ptr, h_ptr, sq_ptr, NPART, eps, s_r, s_h,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SWIGLU: tl.constexpr,
    PRE_NORM: tl.constexpr, EPI_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    r_ok = rows < B
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # the output transposed: the weights are the wide operand
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # SWIGLU: the up projection's columns, rows N + cols of w
    for k0 in range(0, K, BLOCK_K):
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


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton form runs: at most `MAX_ROWS` rows, CUDA 16-bit weights (float32 keeps cuBLAS), or CPU
    tensors under the interpreter."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        return False
    if interpreting() and x.device.type == "cpu":
        return True
    return x.is_cuda and w.dtype in (torch.float16, torch.bfloat16) and x.dtype == w.dtype


def _launch(x, w, bias, n_out, swiglu, config, pre=None, epi=None):
    """The Triton form, or None where it does not run (see `supported`). `pre`: a `Normed` input (`x` is ``h · g``,
    scaled by its rows' ``1 / rms`` in the epilogue); `epi`: ``(residual, g, h, sq)``, the epilogue's outputs."""
    B, K = x.shape
    cfg = config or DEFAULT_CONFIG
    block_k = cfg.block_k
    while K % block_k:  # whole blocks along K: no masks in the streaming loop
        block_k //= 2
    if not supported(x, w) or block_k < 16 or x.stride(-1) != 1 or w.stride(-1) != 1:
        return None
    grid = triton.cdiv(n_out, cfg.block_n)
    if epi is not None:
        r, g, h, sq = epi
    else:  # pointers the kernel does not touch, but for the partial sums a normed input reads
        r, g, h, sq = x, w, x, pre.sq if pre is not None else x
    npart, eps = (sq.shape[0], pre.eps) if pre is not None else (grid, 0.0)
    out = torch.empty(B, n_out, dtype=x.dtype, device=x.device)
    _linear_kernel[(grid,)](
        x, w, bias if bias is not None else w, out, B, n_out, K, x.stride(0), w.stride(0), out.stride(0),
        r, g, h, sq, npart, float(eps), r.stride(0), h.stride(0),
        HAS_BIAS=bias is not None, UPCAST=x.device.type == "cpu", IEEE=x.dtype == torch.float32, SWIGLU=swiglu,
        PRE_NORM=pre is not None, EPI_NORM=epi is not None,
        BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
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
    themselves (``sq`` None), or, from `residual_norm_linear`'s Triton form, ``x = h · g`` and ``sq`` ``[P, 16]``,
    per-program partial sums of ``h²``, whose total over ``P`` gives each row's ``1 / sqrt(mean(h²) + eps)``."""

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
    cfg = config or DEFAULT_CONFIG
    # n is the normed rows' K in normed_linear: whole 16s there
    if residual.stride(-1) == 1 and residual.dtype == x.dtype and n % 16 == 0 and supported(x, w):
        h = torch.empty_like(residual)
        sq = torch.empty(triton.cdiv(n, cfg.block_n), MAX_ROWS, dtype=torch.float32, device=x.device)
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
