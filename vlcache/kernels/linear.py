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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .fused_ops import silu_mul
from .launch import interpreting

__all__ = ["QKV_CONFIG", "SWIGLU_CONFIG", "LinearConfig", "decode_linear", "supported", "swiglu_linear"]

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
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    if HAS_BIAS:  # in float32 before the one rounding, as addmm
        acc += tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[:, None]
        if SWIGLU:
            acc_up += tl.load(b_ptr + N + cols, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if SWIGLU:  # fused_ops.silu_mul on the rounded projections, op for op
        g = acc.to(ty).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
        acc = a * acc_up.to(ty).to(tl.float32)
    ok = c_ok[:, None] & r_ok[None, :]
    tl.store(o_ptr + rows[None, :] * s_o + cols[:, None], acc.to(ty), mask=ok)


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton form runs: at most `MAX_ROWS` rows, CUDA 16-bit weights (float32 keeps cuBLAS), or CPU
    tensors under the interpreter."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        return False
    if interpreting() and x.device.type == "cpu":
        return True
    return x.is_cuda and w.dtype in (torch.float16, torch.bfloat16) and x.dtype == w.dtype


def _launch(x, w, bias, n_out, swiglu, config):
    """The Triton form, or None where it does not run (see `supported`)."""
    B, K = x.shape
    cfg = config or DEFAULT_CONFIG
    block_k = cfg.block_k
    while K % block_k:  # whole blocks along K: no masks in the streaming loop
        block_k //= 2
    if not supported(x, w) or block_k < 16 or x.stride(-1) != 1 or w.stride(-1) != 1:
        return None
    out = torch.empty(B, n_out, dtype=x.dtype, device=x.device)
    _linear_kernel[(triton.cdiv(n_out, cfg.block_n),)](
        x, w, bias if bias is not None else w, out, B, n_out, K, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, UPCAST=x.device.type == "cpu", IEEE=x.dtype == torch.float32, SWIGLU=swiglu,
        BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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
