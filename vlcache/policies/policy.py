"""A policy = scorer + allocator + reducer + decode rule, plus granularity, sinks and recent window.

`Policy` runs the common steps of policies.md §1-2 around the parts: it gathers the attention statistics the
parts ask for during prefill (one scoring-core call per layer and row set), turns the allocator's targets into
integer keep counts `k_l = clamp(round(β_l · m), min_keep, m)`, picks the kept keys (protected keys first, then
by score, per KV head or per layer), lets the reducer merge what is dropped, and shrinks the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from vlcache.cache import CompressedCache
from vlcache.kernels.launch import on_device
from vlcache.models.prompt import PromptInfo
from vlcache.policies import allocators, decode_rules, reducers, scorers  # noqa: F401  (register the parts)
from vlcache.policies.parts import (
    ALLOCATORS,
    DECODE_RULES,
    REDUCERS,
    SCORERS,
    LayerStats,
    RowSet,
    build_part,
)

log = logging.getLogger(__name__)

GRANULARITIES = ("kv_head", "layer")


@dataclass
class PolicyConfig:
    """The composed `policy` config group (conf/policy/<preset>.yaml and its sub-groups)."""

    name: str
    scorer: dict
    allocator: dict
    reducer: dict
    decode: dict
    granularity: str = "kv_head"
    sinks: int = 0
    recent: float = 0.0  # < 1: fraction of each layer's keep count; >= 1: an absolute number of tokens
    keep_all: bool = False  # `full`: compaction only, every prompt entry stays
    postvision_fallback: bool = False  # VL-Cache with no post-vision rows: use the last rows instead of failing

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.sinks < 0 or self.recent < 0:
            raise ValueError(f"sinks and recent must be >= 0 (got sinks={self.sinks}, recent={self.recent})")


@dataclass
class CompressionReport:
    """What compression did, for metrics.json and the allocation figures."""

    keep_counts: torch.Tensor  # [L, B, Hkv] kept entries
    prompt_lengths: torch.Tensor  # [B] real prompt tokens
    sparsity: torch.Tensor | None = None  # [L, B] post-vision sparsity γ_l, when the allocator measured it
    clamped: int = 0  # (layer, sequence) pairs whose budget was raised to the protected tokens
    notes: list[str] = field(default_factory=list)

    @property
    def realised_budget(self) -> float:
        layers, _, heads = self.keep_counts.shape
        return float(self.keep_counts.sum()) / float(self.prompt_lengths.sum() * layers * heads)

    @property
    def layer_budgets(self) -> list[float]:
        heads = self.keep_counts.shape[2]
        return (self.keep_counts.sum((1, 2)).double() / (self.prompt_lengths.sum() * heads)).tolist()


class Policy:
    def __init__(self, cfg: PolicyConfig, budget: float) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.cfg, self.budget = cfg, budget
        self.scorer = build_part(SCORERS, "scorer", cfg.scorer)
        self.allocator = build_part(ALLOCATORS, "allocator", cfg.allocator)
        self.reducer = build_part(REDUCERS, "reducer", cfg.reducer)
        self.decode_rule = build_part(DECODE_RULES, "decode rule", cfg.decode)
        self.stats: list[LayerStats] = []
        self.info: PromptInfo | None = None

    # -- prefill -------------------------------------------------------------------------------------------
    def row_sets(self) -> dict[RowSet, float | None]:
        """The row sets the parts need, each with the sparsity threshold to count on it (or None)."""
        if self.cfg.keep_all:
            return {}
        wanted: dict[RowSet, float | None] = {}
        if self.scorer.rows is not None:
            wanted[self.scorer.rows] = None
        if self.allocator.rows is not None:
            wanted[self.allocator.rows] = self.allocator.threshold
        return wanted

    def begin(self, info: PromptInfo, num_layers: int):
        """Prepares for one batch; returns the prefill observer for the attention function (or None)."""
        self.info = info
        self.stats = [{} for _ in range(num_layers)]
        self._check_images(info)
        wanted = self.row_sets()
        if not wanted:
            return None
        # each row set's first row and row positions, computed once per batch (one host read), not per layer
        spans = {}
        for rows in wanted:
            start = self._row_start(rows, info)
            first = int(start.min())
            idx = torch.arange(first, info.m, device=start.device)
            spans[rows] = first, torch.where(idx >= start[:, None], idx, -1)
        on: dict[torch.device, tuple] = {}  # a model split over GPUs (device_map): the inputs on each layer's GPU

        def observe(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
            from vlcache.kernels import attention_scores

            if query.device not in on:
                on[query.device] = (
                    {rows: pos.to(query.device) for rows, (_, pos) in spans.items()},
                    info.key_valid.to(query.device),
                )
            q_pos, key_valid = on[query.device]
            for rows, threshold in wanted.items():
                first = spans[rows][0]
                with on_device(query):  # this layer's CUDA context for Triton
                    self.stats[layer][rows] = attention_scores(
                        query[:, :, first:], key, q_pos[rows], key_valid=key_valid, threshold=threshold
                    )

        return observe

    def _check_images(self, info: PromptInfo) -> None:
        if self.cfg.keep_all:
            return
        parts = [p for p in (self.scorer, self.allocator) if p.needs_image]
        if parts and not bool(info.has_image.all()):
            bad = (~info.has_image).nonzero().flatten().tolist()
            raise ValueError(
                f"policy {self.cfg.name!r} tells image tokens from text tokens (part {parts[0].registry_name!r}), "
                f"but prompt(s) {bad} of the batch have no image tokens"
            )

    def _row_start(self, rows: RowSet, info: PromptInfo) -> torch.Tensor:
        """`[B]` first row of each sequence's row set; every row set is a suffix of the prompt."""
        if rows.kind == "all":
            return info.pad
        if rows.kind == "window":
            return torch.maximum(info.pad, torch.full_like(info.pad, info.m - rows.window))
        if rows.kind == "postvision":
            start = info.postvision_start
            empty = start >= info.m
            if bool(empty.any()):
                if not (self.cfg.postvision_fallback and rows.fallback_window > 0):
                    bad = empty.nonzero().flatten().tolist()
                    raise ValueError(
                        f"sequences {bad} have no tokens after their last image token, so VL-Cache's post-vision "
                        "window is empty; put the question after the image, or set "
                        "policy.postvision_fallback=true to score with the last rows instead"
                    )
                start = torch.where(empty, max(info.m - rows.fallback_window, 0), start)
                start = torch.maximum(start, info.pad)
            return start
        raise ValueError(f"unknown row set {rows.kind!r}; valid: all, window, postvision")

    # -- compression ---------------------------------------------------------------------------------------
    def sparsity(self) -> torch.Tensor | None:
        """`[L, B]` γ_l: fraction of visible entries below p · rowmax over the allocator's rows, head-averaged."""
        rows = self.allocator.rows
        if rows is None or self.allocator.threshold is None or not self.stats or rows not in self.stats[0]:
            return None
        per_layer = []
        for layer_stats in self.stats:
            s = layer_stats[rows]
            gamma = (s.below.double() / s.visible.clamp(min=1).double()).mean(1)
            per_layer.append(gamma.to(self.info.key_valid.device))
        return torch.stack(per_layer)

    def compress(self, cache: CompressedCache) -> CompressionReport:
        info = self.info
        num_layers = len(cache.layers)
        lengths = info.lengths
        sparsity = self.sparsity()
        if self.cfg.keep_all:
            target = lengths.expand(num_layers, -1)
        else:
            target = self.allocator.allocate(self.budget, info, sparsity, num_layers)
        target = target.to(lengths.device).long()
        report = CompressionReport(keep_counts=torch.empty(0), prompt_lengths=lengths.cpu(), sparsity=sparsity)
        counts, kept_scores, recent = [], [], []
        for layer_idx, layer in enumerate(cache.layers):
            dev = layer.keys.device  # a model split over GPUs (device_map): each layer on its own device
            info_l = info.to(dev)
            k = self._clamp(target[layer_idx].to(dev), lengths.to(dev), report, layer_idx)
            index, count, score = self._select(layer_idx, k, layer.keys.shape[1], info_l)
            merged = None if self.cfg.keep_all else self.reducer.reduce(layer, index, count, info_l)
            layer.keep(index, count, *(merged or ()))
            counts.append(count.to(lengths.device))
            # the kept entries' scores, slot-aligned, for decode rules that go on ranking (H2O)
            slot = torch.arange(index.shape[-1], device=index.device)
            kept_scores.append(torch.where(slot < count[..., None], score.gather(-1, index), 0.0))
            recent.append(self._recent(k).to(lengths.device))
        report.keep_counts = torch.stack(counts).cpu()
        if report.clamped:
            log.warning(
                "budget %.4g keeps fewer tokens than the protected ones (sinks=%d, recent=%s) in %d "
                "(layer, sequence) pairs: raised to the protected count", self.budget, self.cfg.sinks,
                self.cfg.recent, report.clamped,
            )
        self.decode_rule.setup(
            cache, info, self.budget, report.keep_counts,
            scores=None if self.cfg.keep_all else kept_scores,
            sinks=self.cfg.sinks,
            recent=torch.stack(recent),
        )
        return report

    def bind(self, adapter) -> None:
        """Hands the model adapter to the decode rule (StreamingLLM's `rolling` needs the RoPE)."""
        self.decode_rule.bind(adapter)

    def _recent(self, k: torch.Tensor) -> torch.Tensor:
        r = self.cfg.recent
        return torch.round(r * k.double()).long() if r < 1 else torch.full_like(k, int(r))

    def _clamp(self, k: torch.Tensor, lengths: torch.Tensor, report: CompressionReport, layer: int) -> torch.Tensor:
        """`k = clamp(k, min_keep, m)`, with min_keep the protected tokens (and at least one)."""
        min_keep = torch.full_like(k, self.cfg.sinks)
        if self.cfg.recent >= 1:
            min_keep = min_keep + int(self.cfg.recent)
        min_keep = min_keep.clamp(min=1)  # at least one in all: not one on top of the window
        min_keep = torch.minimum(min_keep, lengths)
        report.clamped += int((k < min_keep).sum())
        return torch.minimum(torch.maximum(k, min_keep), lengths)

    def _select(self, layer: int, k: torch.Tensor, num_heads: int, info: PromptInfo):
        """Kept indices `[B, Hkv, K]` (ascending), counts `[B, Hkv]`, and the scores `[B, Hkv, m]` used."""
        b, m = info.batch, info.m
        valid = info.key_valid
        idx = torch.arange(m, device=valid.device)
        if self.cfg.keep_all:
            score = idx.float().expand(b, 1, m)
            protected = torch.zeros(b, 1, m, dtype=torch.bool, device=valid.device)
        else:
            score = self.scorer.score(layer, self.stats[layer], info).float()
            if self.cfg.granularity == "layer":
                score = score.mean(1, keepdim=True)
            sinks = (idx >= info.pad[:, None]) & (idx < (info.pad + self.cfg.sinks)[:, None])
            recent = idx >= (m - self._recent(k))[:, None]
            protected = (sinks | recent)[:, None]
        score = raw = score.expand(b, num_heads, m)
        protected = protected.expand(b, num_heads, m) & valid[:, None]
        count = torch.maximum(k[:, None], protected.sum(-1))
        extra = None if self.cfg.keep_all else self.scorer.protected(layer, info)
        if extra is not None:
            extra = extra[:, None].expand(b, num_heads, m) & valid[:, None] & ~protected
            count = count + extra.sum(-1)
            protected = protected | extra
        count = torch.minimum(count, info.lengths[:, None])
        score = torch.where(protected, torch.inf, score)
        score = torch.where(valid[:, None], score, -torch.inf)
        kmax = int(count.max())
        top = score.topk(kmax, dim=-1).indices
        slot = torch.arange(kmax, device=valid.device)
        top = torch.where(slot < count[..., None], top, m).sort(-1).values
        return torch.where(top == m, 0, top), count, raw


def build_policy(cfg: dict, budget: float) -> Policy:
    """Builds a policy from the composed `policy` config (a plain dict)."""
    return Policy(PolicyConfig(**cfg), budget)
