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


def _visibility(q_pos: torch.Tensor, key_valid: torch.Tensor | None, Nk: int, offset: int = 0) -> torch.Tensor:
    """``[B, Nq, Nk]`` bool for keys ``offset .. offset + Nk - 1`` (``key_valid`` holds just those):
    causal (``j <= pos``), key validity, and ``pos < 0`` sees nothing."""
    j = torch.arange(offset, offset + Nk, device=q_pos.device)
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


def _span(cols: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)`` from the first to the last True of a 1-D bool tensor (``(0, 0)`` if none)."""
    idx = cols.nonzero()
    return (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)


def attention_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    threshold: float | None = None,
    max_chunk_rows: int = 1024,
    max_chunk_elems: int = 1 << 20,
) -> AttentionScores:
    """Float32 PyTorch fallback of the scoring core, same semantics as the reference.

    Rows are processed in chunks (at most ``max_chunk_rows``, and few enough that one chunk's
    logits hold at most ``max_chunk_elems`` floats) so memory stays O(chunk × keys), not
    O(rows × keys). The default (4 MB of logits) keeps a chunk in the CPU's L2 caches between
    the steps that touch it (matmul, mask, softmax, column sum): with chunks of hundreds of MB
    the fallback was bound by memory traffic and page faults rather than arithmetic.

    Two savings that change nothing but the work done, for causal rows over the whole prompt
    (H2O's accumulated attention, the heaviest case): a chunk multiplies only the keys its rows
    can reach (``j <= max q_pos``), about half of them on average; and without a threshold, the
    mask is written only on the key columns that some row of the chunk cannot see (the causal
    edge of the chunk and the columns with invalid keys), not on the whole chunk.

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
    kt = k.detach().to(torch.float32).transpose(-1, -2)  # [B, Hkv, D, Nk]; upcast once (no-op for float32)
    qs = q.detach().to(torch.float32) * scale  # the scale on q: one pass over rows × D, not over rows × keys
    pos = q_pos.to(torch.long)
    # A row sees something iff pos >= 0 and its sequence has a valid key at or before pos.
    if key_valid is None:
        first_valid = torch.zeros(B, 1, dtype=torch.long, device=dev)
        bad_lo, bad_hi = 0, 0
    else:
        # a sequence with no valid key: no row sees anything, even one past the last key
        never = torch.iinfo(torch.long).max
        first_valid = torch.where(key_valid.any(1), key_valid.long().argmax(1), never)[:, None]
        bad_lo, bad_hi = _span(~key_valid.all(0))  # columns where some sequence has an invalid key
    seen_all = (pos >= 0) & (pos >= first_valid)  # [B, Nq]
    # Per row position, over the batch: the keys it can reach (max pos + 1, in [0, Nk]) and, among rows that
    # see something, the smallest pos (every key up to it is causally visible to all of them).
    reach = (pos.amax(0).clamp(min=-1, max=Nk - 1) + 1).tolist()
    low = torch.where(seen_all, pos, Nk).amin(0).tolist()
    row_any = seen_all.any(0).tolist()
    per_row_key = B * Hq
    r0 = 0
    while r0 < Nq:
        # Grow the chunk while its [B, Hq, rows, reach] logits fit the element budget.
        hi, r1 = reach[r0], r0 + 1
        while r1 < Nq and r1 - r0 < max_chunk_rows:
            h = max(hi, reach[r1])
            if (r1 + 1 - r0) * h * per_row_key > max_chunk_elems:
                break
            hi, r1 = h, r1 + 1
        c, rows = r1 - r0, slice(r0, r1)
        r0 = r1
        if hi == 0 or not any(row_any[rows]):  # no row of the chunk sees any key
            continue
        # [B, Hkv, G·c, D]: the query heads of each KV head stacked on the row axis, so k needs no repeat
        qc = qs[:, :, rows].reshape(B, Hkv, G * c, D)
        logits = torch.matmul(qc, kt[..., :hi]).view(B, Hkv, G, c, hi)
        pos_c = pos[:, rows]
        if threshold is not None:  # the counts need the whole mask anyway (few rows: post-vision, windows)
            assert below is not None and visible is not None
            vis = _visibility(pos_c, None if key_valid is None else key_valid[:, :hi], hi).view(B, 1, 1, c, hi)
            logits.masked_fill_(~vis, float("-inf"))
            rowmax = logits.amax(dim=-1, keepdim=True)  # -inf on rows that see nothing: their vis is all False
            below += ((logits - rowmax < log_p) & vis).sum(dim=(3, 4)).reshape(B, Hq)
            visible += vis.sum(dim=(1, 2, 3, 4)).view(B, 1)
        else:
            # Mask only the column spans some seen row cannot see: invalid keys, and keys past the smallest
            # position of the chunk (an unseen row's own logits are left as they are: it is zeroed below).
            spans = [(bad_lo, min(bad_hi, hi)), (min(low[rows]) + 1, hi)]
            if spans[0][1] >= spans[1][0]:  # overlapping or touching: one span
                spans = [(min(spans[0][0], spans[1][0]), hi)]
            for lo_j, hi_j in spans:
                if lo_j >= hi_j:
                    continue
                vis = _visibility(pos_c, None if key_valid is None else key_valid[:, lo_j:hi_j], hi_j - lo_j,
                                  offset=lo_j)
                logits[..., lo_j:hi_j].masked_fill_(~vis.view(B, 1, 1, c, hi_j - lo_j), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        seen = seen_all[:, rows]
        if not bool(seen.all()):  # a row that sees nothing contributes nothing (softmax made it NaN or junk)
            probs.masked_fill_(~seen.view(B, 1, 1, c, 1), 0.0)
        col[:, :, :hi] += probs.sum(dim=(2, 3))
    return AttentionScores(col=col, below=below, visible=visible)
