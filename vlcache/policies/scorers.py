"""Scorers: importance of each prompt key per layer and KV head (policies.md §2-3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlcache.models.prompt import PromptInfo
from vlcache.policies.parts import SCORERS, LayerStats, RowSet, Scorer, register


@register(SCORERS, "recency")
class Recency(Scorer):
    """StreamingLLM (Xiao et al., ICLR 2024): the most recent keys first (the policy protects the sinks)."""

    def score(self, layer: int, stats: LayerStats, info: PromptInfo) -> torch.Tensor:
        pos = torch.arange(info.m, device=info.key_valid.device, dtype=torch.float32)
        return pos.expand(info.batch, 1, info.m)


@register(SCORERS, "random")
class Random(Scorer):
    """A seeded uniformly random ranking: the floor every real policy must beat."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, layer: int, stats: LayerStats, info: PromptInfo) -> torch.Tensor:
        s = torch.rand(info.batch, 1, info.m, generator=self.generator)
        return s.to(info.key_valid.device)


def _text_mask(info: PromptInfo) -> torch.Tensor:
    """`[B, m]` real prompt tokens that are not image tokens."""
    return info.key_valid & ~info.image_mask


@register(SCORERS, "accumulated")
class Accumulated(Scorer):
    """H2O (Zhang et al., NeurIPS 2023, §3.2 "heavy hitters"): `s[j] = Σ_{every prompt row q} A[q, j]`.

    Causal over the full `m × m` matrix and not normalised by how many rows see `j`, so early tokens are
    favoured, as published. Per KV head the core sums over the group's query heads (GQA). Elastic Cache
    (Liu et al., ECCV 2024, §3.2) ranks by the same sums averaged over heads (`granularity: layer`).
    """

    rows = RowSet("all")

    def score(self, layer: int, stats: LayerStats, info: PromptInfo) -> torch.Tensor:
        return stats[self.rows].col


@register(SCORERS, "text_prior")
class TextPrior(Accumulated):
    """LOOK-M (Wan et al., EMNLP Findings 2024, §3.2 "text-prior"): accumulated scores, then every text
    key gets `+max_j s[j]` (per head) so that all text keys outrank every image key.

    keep_text: also keep every text key on top of the budget (LOOK-M's prompt rule; the realised budget
        can exceed the nominal one); off, text keys only win the ranking within the budget.
    """

    needs_image = True

    def __init__(self, keep_text: bool = True) -> None:
        self.keep_text = keep_text

    def score(self, layer: int, stats: LayerStats, info: PromptInfo) -> torch.Tensor:
        s = super().score(layer, stats, info)
        top = s.masked_fill(~info.key_valid[:, None], 0).amax(-1, keepdim=True)
        return s + torch.where(_text_mask(info)[:, None], top, 0.0)

    def protected(self, layer: int, info: PromptInfo) -> torch.Tensor | None:
        return _text_mask(info) if self.keep_text else None


@register(SCORERS, "window")
class Window(Scorer):
    """SnapKV (Li et al., NeurIPS 2024, §4.2) and PyramidKV (Cai et al., 2024): the votes of the
    observation window (the last `window` prompt rows), summed over rows, pooled over the key axis
    (kernel `kernel`, stride 1, padding `kernel // 2`).

    As in the official code the pooling sees only the keys before the window (window keys count as zero
    padding, like a batch's left padding; avg-pooling counts padding in, as `F.avg_pool1d` does), and the
    window keys themselves rank above every other key (SnapKV's `k` includes the `w` window keys), the
    most recent first when `k < w`.
    """

    def __init__(self, window: int = 32, pooling: str = "maxpool", kernel: int = 7) -> None:
        if pooling not in ("maxpool", "avgpool"):
            raise ValueError(f"unknown pooling {pooling!r}; valid: maxpool, avgpool")
        if kernel < 1 or kernel % 2 == 0 or window < 1:
            raise ValueError(f"need window >= 1 and an odd kernel >= 1 (got {window=}, {kernel=})")
        self.window, self.pooling, self.kernel = window, pooling, kernel
        self.rows = RowSet("window", window=window)

    def score(self, layer: int, stats: LayerStats, info: PromptInfo) -> torch.Tensor:
        col = stats[self.rows].col.float()
        b, h, m = col.shape
        pos = torch.arange(m, device=col.device)
        in_window = pos >= m - self.window
        flat = col.masked_fill(in_window, 0.0).reshape(b * h, 1, m)
        pool = F.max_pool1d if self.pooling == "maxpool" else F.avg_pool1d
        pooled = pool(flat, kernel_size=self.kernel, stride=1, padding=self.kernel // 2).reshape(b, h, m)
        above = pooled.amax(-1, keepdim=True) + 1.0
        return torch.where(in_window, above + pos.float(), pooled)


@register(SCORERS, "postvision")
class PostVision(Scorer):
    """VL-Cache (Tu et al., ICLR 2025, §4.2 "modality-aware token scoring"): `s[j] = Σ_{q ∈ [v, m)} A[q, j]`,
    the attention the post-vision rows (the question) pay each key; image and text keys compete in one
    ranking, no pooling.

    fallback_window: rows used for a prompt with nothing after its last image token, when
        `policy.postvision_fallback` is on (otherwise such a prompt is an error).
    """

    needs_image = True

    def __init__(self, fallback_window: int = 32) -> None:
        self.rows = RowSet("postvision", fallback_window=fallback_window)

    def score(self, layer: int, stats: LayerStats, info: PromptInfo) -> torch.Tensor:
        return stats[self.rows].col
