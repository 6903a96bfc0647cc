"""The four part kinds of a policy (policies.md §2) and their registries.

A preset is data: `conf/policy/<name>.yaml` names one scorer, allocator, reducer and decode rule (each a
sub-group with its own keys). This module holds the interfaces every part implements and the tables that map
config names to classes; the parts themselves live in scorers.py, allocators.py, reducers.py, decode_rules.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from vlcache.cache import CompressedCache, CompressedLayer
    from vlcache.kernels import AttentionScores
    from vlcache.models.prompt import PromptInfo


@dataclass(frozen=True)
class RowSet:
    """Which prompt rows (queries) an attention statistic is taken over (policies.md §4).

    kind: "all" (every prompt row), "window" (the last `window` rows), "postvision" (rows after the last image
    token, VL-Cache's dynamic window; `fallback_window` rows when a prompt has none and the fallback is on).
    """

    kind: str
    window: int = 0
    fallback_window: int = 0


# Statistics gathered during prefill: for each layer, for each row set, the scoring core's output.
LayerStats = dict[RowSet, "AttentionScores"]


class Scorer:
    """How important each prompt key is, per layer and KV head. Higher is kept first."""

    rows: RowSet | None = None  # the row set whose attention it needs; None for attention-free scorers
    needs_image: ClassVar[bool] = False  # tells image from text tokens, so a prompt without an image is an error

    def score(self, layer: int, stats: LayerStats, info: PromptInfo) -> torch.Tensor:
        """`[B, Hkv, m]` float scores over the padded prompt (padding is masked out by the caller)."""
        raise NotImplementedError

    def protected(self, layer: int, info: PromptInfo) -> torch.Tensor | None:
        """`[B, m]` keys that must be kept on top of the budget (LOOK-M's text keys), or None."""
        return None


class Allocator:
    """How many keys each layer keeps: `[L, B]` target counts (before clamping to [min_keep, m])."""

    rows: RowSet | None = None
    threshold: float | None = None  # relative sparsity threshold p, when it needs layer sparsity
    needs_image: ClassVar[bool] = False

    def allocate(
        self, budget: float, info: PromptInfo, sparsity: torch.Tensor | None, num_layers: int
    ) -> torch.Tensor:
        raise NotImplementedError


class Reducer:
    """What happens to keys that are not kept: `None` to drop them, or merged `(keys, values)` for the kept."""

    def reduce(
        self, layer: CompressedLayer, index: torch.Tensor, count: torch.Tensor, info: PromptInfo
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


class DecodeRule:
    """What happens to the cache while tokens are generated."""

    acts_per_token: ClassVar[bool] = False  # whether on_token must be called at all (append: no)

    def bind(self, adapter) -> None:
        """Called once per batch before prefill with the model adapter (for rules that need the model)."""

    def setup(
        self,
        cache: CompressedCache,
        info: PromptInfo,
        budget: float,
        keep_counts: torch.Tensor,
        *,
        scores: list[torch.Tensor] | None = None,
        sinks: int = 0,
        recent: torch.Tensor | None = None,
    ) -> None:
        """Called once after compression; `keep_counts` is `[L, B, Hkv]`.

        `scores` (per layer `[B, Hkv, K]`, aligned with the cache slots; None for `full`) are the scorer's
        scores of the kept entries, `sinks` the policy's sink count and `recent` (`[L, B]`) its recent-window
        size per layer: what a rule that keeps evicting during decoding (H2O) needs to go on ranking.
        """

    def on_token(self, layer_idx: int, query: torch.Tensor, cache: CompressedCache) -> None:
        """Called in each layer after the new token's entry was appended and attended."""


SCORERS: dict[str, type[Scorer]] = {}
ALLOCATORS: dict[str, type[Allocator]] = {}
REDUCERS: dict[str, type[Reducer]] = {}
DECODE_RULES: dict[str, type[DecodeRule]] = {}


def register(table: dict, name: str):
    def deco(cls):
        table[name] = cls
        cls.registry_name = name
        return cls

    return deco


def build_part(table: dict, kind: str, cfg: dict):
    """Instantiates a part from its config group (`name` plus the part's own keys)."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name](**cfg)
