"""Allocators: how many keys each layer keeps (policies.md §2-3)."""

from __future__ import annotations

import torch

from vlcache.models.prompt import PromptInfo
from vlcache.policies.parts import ALLOCATORS, Allocator, RowSet, register


@register(ALLOCATORS, "uniform")
class Uniform(Allocator):
    """Every layer keeps `round(budget · m)` keys."""

    def allocate(
        self, budget: float, info: PromptInfo, sparsity: torch.Tensor | None, num_layers: int
    ) -> torch.Tensor:
        keep = torch.round(budget * info.lengths.double()).long()
        return keep.expand(num_layers, -1)


@register(ALLOCATORS, "pyramid")
class Pyramid(Allocator):
    """PyramidKV (Cai et al., 2024; Zefan-Cai/KVCache-Factory `PyramidKVCluster`): keep counts fall linearly
    from layer 0 to the last layer, with the integer arithmetic of the official code.

    With `C = round(budget · m)` the average keep count per layer including the `window` (`w`)
    keys: `min = (C − w) // beta`, `max = 2(C − w) − min`; if `max ≥ m − w`: `max = m − w`,
    `min = 2(C − w) − max`; `step = (max − min) // (L − 1)`; layer `l` keeps `max − l · step + w`.
    When `m < 2(C − w)` every layer keeps `C` (the code's uniform branch). The floor divisions move
    the realised budget (up, by less than (L − 1) / (2m)).
    """

    def __init__(self, window: int = 8, beta: int = 20) -> None:
        if window < 0 or beta < 1:
            raise ValueError(f"window must be >= 0 and beta >= 1 (got window={window}, beta={beta})")
        self.window, self.beta = window, beta

    def allocate(
        self, budget: float, info: PromptInfo, sparsity: torch.Tensor | None, num_layers: int
    ) -> torch.Tensor:
        return torch.stack([self.counts(int(m), budget, num_layers) for m in info.lengths.tolist()], 1).to(
            info.lengths.device
        )

    def counts(self, m: int, budget: float, num_layers: int) -> torch.Tensor:
        """`[L]` keep counts (window included) for one sequence of `m` prompt tokens."""
        w, c = self.window, round(budget * m)
        if c >= m:
            return torch.full((num_layers,), m, dtype=torch.long)
        if c <= w or num_layers == 1 or m < 2 * (c - w):
            # nothing to shape: too small for more than the window (the policy clamps and logs), one layer, or
            # the official code's uniform branch
            return torch.full((num_layers,), c, dtype=torch.long)
        low = (c - w) // self.beta
        high = 2 * (c - w) - low
        if high >= m - w:
            high = m - w
            low = 2 * (c - w) - high
        step = (high - low) // (num_layers - 1)
        return high - step * torch.arange(num_layers) + w


@register(ALLOCATORS, "sparsity")
class Sparsity(Allocator):
    """VL-Cache (Tu et al., ICLR 2025, §4.1, Algorithm 1): budget in proportion to each layer's density.

    `γ_l` is the fraction of visible post-vision attention entries below `p · rowmax` (relative
    threshold, p=0.01), averaged over heads; `d_l = 1 − γ_l`;
    `β_l = clip(d_l / Σ_l' d_l' · budget · L, min_fraction, max_fraction)`; `k_l = round(β_l · m)`.
    No renormalisation after clipping (the realised budget shows its effect). At budget 1 every
    layer keeps everything (the proportional rule would hand sparse layers less than `m`).

    fallback_window: rows for prompts without post-vision tokens when `policy.postvision_fallback`
        is on (keep it equal to the `postvision` scorer's so both share one scoring pass).
    """

    needs_image = True

    def __init__(
        self,
        p: float = 0.01,
        min_fraction: float = 0.01,
        max_fraction: float = 1.0,
        fallback_window: int = 32,
    ) -> None:
        if not 0.0 < p < 1.0 or not 0.0 <= min_fraction <= max_fraction <= 1.0:
            raise ValueError(f"need 0 < p < 1 and 0 <= min_fraction <= max_fraction <= 1 (got {p}, "
                             f"{min_fraction}, {max_fraction})")
        self.rows = RowSet("postvision", fallback_window=fallback_window)
        self.threshold = p
        self.min_fraction, self.max_fraction = min_fraction, max_fraction

    def fractions(self, budget: float, sparsity: torch.Tensor) -> torch.Tensor:
        """`[L, B]` β_l from `[L, B]` γ_l (Algorithm 1)."""
        density = 1.0 - sparsity.double()
        total = density.sum(0, keepdim=True)
        num_layers = density.shape[0]
        share = torch.where(total > 0, density / total.clamp(min=1e-12), 1.0 / num_layers)
        return (share * budget * num_layers).clamp(self.min_fraction, self.max_fraction)

    def allocate(
        self, budget: float, info: PromptInfo, sparsity: torch.Tensor | None, num_layers: int
    ) -> torch.Tensor:
        lengths = info.lengths
        if budget >= 1.0:
            return lengths.expand(num_layers, -1)
        if sparsity is None:
            raise ValueError("the sparsity allocator needs the post-vision layer sparsity (none measured)")
        beta = self.fractions(budget, sparsity).to(lengths.device)
        return torch.round(beta * lengths.double()).long()
