"""The decode step's smaller projections as one Triton launch each: ``x @ W.T (+ bias)`` for a few rows.

At one token per sequence a projection reads its whole weight matrix for a few rows of input: a memory-bound
matrix-vector product. cuBLAS reads the 7B model's large MLP weights near the copy bandwidth, but its output and
down projections (34 and 117 MB) through split-K and a separate reduction launch. Here one program owns
``block_n`` output columns for up to 16 rows and streams its weight rows once along K, ``num_stages`` tiles in
flight: no split, no second launch. On an H200 (experiments/linear_sweep.py, results/bench/linear_sweep_h200.json)
at batch 1-16 that takes the output projection from 13.5-13.8 to 11.4-11.8 µs and the down projection from
32.1-33.0 to 30.3-30.7 µs; for the q/k/v and gate/up projections cuBLAS is about as fast, and at batch 64 (a
64-row-tile draft, not kept) it was faster for all four. A draft that also folded the RMSNorm or SwiGLU into the
load of the input (not kept) was slower: each tile's extra arithmetic stalled the load pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import interpreting

__all__ = ["LinearConfig", "decode_linear", "supported"]

MAX_ROWS = 16  # one tile of rows: beyond it cuBLAS is the better choice (and the weights would be read twice)


@dataclass
class LinearConfig:
    """Launch parameters: ``block_n`` output columns per program (the tile's M axis), ``block_k`` of the input
    per step (halved until it divides K; below 16 the PyTorch form runs)."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 5


DEFAULT_CONFIG = LinearConfig()


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, B, N, K, s_x, s_w, s_o,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    r_ok = rows < B
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)  # the output transposed: the weights are the wide operand
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * s_w + kk[None, :], mask=c_ok[:, None], other=0.0)
        x = tl.load(x_ptr + rows[None, :] * s_x + kk[:, None], mask=r_ok[None, :], other=0.0)
        if UPCAST:  # interpreter: 16-bit tl.dot is wrong there
            w, x = w.to(tl.float32), x.to(tl.float32)
        if IEEE:
            acc = tl.dot(w, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
    if HAS_BIAS:  # in float32 before the one rounding, as addmm
        acc += tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    ok = c_ok[:, None] & r_ok[None, :]
    tl.store(o_ptr + rows[None, :] * s_o + cols[:, None], acc.to(o_ptr.dtype.element_ty), mask=ok)


def supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the Triton form runs: at most `MAX_ROWS` rows, CUDA 16-bit weights (float32 keeps cuBLAS), or CPU
    tensors under the interpreter."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        return False
    if interpreting() and x.device.type == "cpu":
        return True
    return x.is_cuda and w.dtype in (torch.float16, torch.bfloat16) and x.dtype == w.dtype


def decode_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, config: LinearConfig | None = None
) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for ``x`` ``[B, K]``, ``w`` ``[N, K]``: the Triton form where `supported`, else
    ``F.linear`` itself."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"decode_linear: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    B, K = x.shape
    N = w.shape[0]
    cfg = config or DEFAULT_CONFIG
    block_k = cfg.block_k
    while K % block_k:  # whole blocks along K: no masks in the streaming loop
        block_k //= 2
    if not supported(x, w) or block_k < 16 or x.stride(-1) != 1 or w.stride(-1) != 1:
        return F.linear(x, w, bias)
    out = torch.empty(B, N, dtype=x.dtype, device=x.device)
    _linear_kernel[(triton.cdiv(N, cfg.block_n),)](
        x, w, bias if bias is not None else w, out, B, N, K, x.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, UPCAST=x.device.type == "cpu", IEEE=x.dtype == torch.float32,
        BLOCK_M=MAX_ROWS, BLOCK_N=cfg.block_n, BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out
