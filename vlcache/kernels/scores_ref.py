"""PyTorch forms of the scoring core (policies.md §4): a float64 reference and a float32 fallback.

Both compute, for a set of query rows, the reductions of ``A = softmax(q kᵀ · scale)`` that
the eviction policies need:

* column sums ``Σ_rows A[q, j]`` summed over the query heads of each KV group -- the
  accumulated attention of H2O (Zhang et al. 2023, eq. for the "heavy-hitter" score), the
  observation-window vote of SnapKV (Li et al. 2024, §4.2, before pooling), the post-vision
  attention of VL-Cache (Tu et al. 2024, §4.2) and the prompt-wide scores that Elastic Cache
  (Liu et al. 2024) and LOOK-M (Wan et al. 2024) rank keys by;
* VL-Cache's relative-threshold sparsity (§4.1): per (batch, query head), the number of
  visible entries with ``A[q, j] < p · max_j A[q, j]`` and the number of visible entries.

Visibility: a row at position ``p`` sees keys ``j <= p`` with ``key_valid[b, j]``; a row with
``p < 0`` sees nothing and contributes nothing. Softmax is normalised over the visible keys of
each row, so column sums over a subset of rows are exact (not renormalised over the subset).

``attention_scores_reference`` materialises the whole rows × keys matrix in float64: it is
the definition, for tests only. ``attention_scores_torch`` is the float32 fallback used on CPU
without Triton; it processes rows in chunks so it never holds the full rows × keys matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AttentionScores", "attention_scores_reference", "attention_scores_torch", "check_inputs"]


@dataclass
class AttentionScores:
    """Result of the scoring core.

    col: ``[B, Hkv, Nk]`` float32, column sums of the row-normalised attention, summed over the
        rows and over the query heads of each KV head.
    below: ``[B, Hq]`` int64, visible entries with probability ``< p · rowmax``, summed over
        rows (VL-Cache relative sparsity numerator); None unless a threshold was given.
    visible: ``[B, Hq]`` int64, visible entries summed over rows (the denominator); None unless
        a threshold was given.
    """

    col: torch.Tensor
    below: torch.Tensor | None = None
    visible: torch.Tensor | None = None


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    key_valid: torch.Tensor | None,
    threshold: float | None,
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return ``(B, Hq, Hkv, Nq, Nk, D)``."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, H, N, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if tuple(q_pos.shape) != (B, Nq):
        raise ValueError(f"q_pos must be [B, Nq] = {(B, Nq)}; got {tuple(q_pos.shape)}")
    if q_pos.dtype.is_floating_point or q_pos.dtype == torch.bool:
        raise ValueError("q_pos must be an integer tensor")
    if key_valid is not None:
        if tuple(key_valid.shape) != (B, Nk):
            raise ValueError(f"key_valid must be [B, Nk] = {(B, Nk)}; got {tuple(key_valid.shape)}")
        if key_valid.dtype != torch.bool:
            raise ValueError("key_valid must be a bool tensor")
    if threshold is not None and not (0.0 < float(threshold) < 1.0):
        raise ValueError(f"threshold must lie in (0, 1); got {threshold}")
    return B, Hq, Hkv, Nq, Nk, D


def _visibility(q_pos: torch.Tensor, key_valid: torch.Tensor | None, Nk: int) -> torch.Tensor:
    """``[B, Nq, Nk]`` bool: causal (``j <= pos``), key validity, and ``pos < 0`` sees nothing."""
    j = torch.arange(Nk, device=q_pos.device)
    vis = j.view(1, 1, Nk) <= q_pos.to(torch.long).unsqueeze(-1)  # pos < 0 => all False
    if key_valid is not None:
        vis = vis & key_valid.unsqueeze(1)
    return vis


def attention_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    threshold: float | None = None,
) -> AttentionScores:
    """Float64 definition of the scoring core (materialises rows × keys; tests only).

    Written as literally as possible: probabilities, then ``prob < p · max prob`` on the
    probabilities themselves (VL-Cache §4.1), not on logits, so that it checks the log-domain
    shortcut the kernels take.
    """
    B, Hq, Hkv, Nq, Nk, D = check_inputs(q, k, q_pos, key_valid, threshold)
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    q64 = q.detach().to(torch.float64)
    k64 = k.detach().to(torch.float64).repeat_interleave(G, dim=1)  # head h uses KV head h // G
    logits = torch.einsum("bhqd,bhkd->bhqk", q64, k64) * scale
    vis = _visibility(q_pos, key_valid, Nk).unsqueeze(1)  # [B, 1, Nq, Nk]
    logits = logits.masked_fill(~vis, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.where(vis, probs, torch.zeros_like(probs))  # rows that see nothing: NaN -> 0
    col = probs.sum(dim=2).view(B, Hkv, G, Nk).sum(dim=2).to(torch.float32)
    if threshold is None:
        return AttentionScores(col=col)
    pmax = probs.amax(dim=-1, keepdim=True)
    below = ((probs < threshold * pmax) & vis).sum(dim=(2, 3))
    visible = vis.expand(B, Hq, Nq, Nk).sum(dim=(2, 3))
    return AttentionScores(col=col, below=below.to(torch.int64), visible=visible.to(torch.int64))


def attention_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    threshold: float | None = None,
    max_chunk_rows: int = 256,
    max_chunk_elems: int = 1 << 26,
) -> AttentionScores:
    """Float32 PyTorch fallback of the scoring core, same semantics as the reference.

    Rows are processed in chunks (at most ``max_chunk_rows``, and few enough that one chunk's
    logits hold at most ``max_chunk_elems`` floats) so memory stays O(chunk × keys), not
    O(rows × keys): with 32K keys and 32 heads a single chunk of 256 rows would already be 1 GB.
    The relative threshold is applied in the logit domain (``logit - rowmax < ln p``), which is
    equivalent to ``prob < p · maxprob`` and needs no second normalisation.
    """
    B, Hq, Hkv, Nq, Nk, D = check_inputs(q, k, q_pos, key_valid, threshold)
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    dev = q.device
    col = torch.zeros(B, Hkv, Nk, dtype=torch.float32, device=dev)
    below = torch.zeros(B, Hq, dtype=torch.int64, device=dev) if threshold is not None else None
    visible = torch.zeros(B, Hq, dtype=torch.int64, device=dev) if threshold is not None else None
    if Nq == 0 or Nk == 0:
        return AttentionScores(col=col, below=below, visible=visible)
    log_p = math.log(threshold) if threshold is not None else 0.0
    kf = k.detach().to(torch.float32)  # [B, Hkv, Nk, D]; upcast once, reused by every chunk
    chunk = max(1, min(max_chunk_rows, max_chunk_elems // max(1, B * Hq * Nk)))
    for r0 in range(0, Nq, chunk):
        r1 = min(Nq, r0 + chunk)
        # [B, Hkv, G, c, D]: group the query heads of each KV head so k needs no repeat.
        qc = q[:, :, r0:r1].detach().to(torch.float32).reshape(B, Hkv, G, r1 - r0, D)
        logits = torch.einsum("bgtcd,bgkd->bgtck", qc, kf) * scale
        vis = _visibility(q_pos[:, r0:r1], key_valid, Nk).view(B, 1, 1, r1 - r0, Nk)
        logits = logits.masked_fill(~vis, float("-inf"))
        rowmax = logits.amax(dim=-1, keepdim=True)
        rowmax = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
        e = torch.exp(logits - rowmax)  # exp(-inf) = 0 on invisible entries
        denom = e.sum(dim=-1, keepdim=True)
        probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
        col += probs.sum(dim=(2, 3))
        if threshold is not None:
            assert below is not None and visible is not None
            below += (((logits - rowmax) < log_p) & vis).sum(dim=(3, 4)).reshape(B, Hq)
            visible += vis.sum(dim=(3, 4)).reshape(B, 1).expand(B, Hq)
    return AttentionScores(col=col, below=below, visible=visible)
