"""Reducers: what happens to keys that are not kept (policies.md §2-3).

A reducer sees the layer's full prompt entries and the kept indices `index` (`[B, Hkv, K]`, ascending;
slots past `count[b, h]` are padding) and returns the kept entries' new keys and values, aligned with
`index`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlcache.cache import CompressedLayer
from vlcache.models.prompt import PromptInfo
from vlcache.policies.parts import REDUCERS, Reducer, register

SIMILARITY_CHUNK = 2048  # prompt keys per similarity block: bounds memory at B·H·chunk·K floats


def _kept(index: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`[B, H, K]` bool: which slots of `index` hold a kept key."""
    return torch.arange(index.shape[-1], device=index.device) < count[..., None]


def _pool_into(layer: CompressedLayer, index: torch.Tensor, target: torch.Tensor, weight: torch.Tensor):
    """The kept entries (keys, values), the sums of `weight · key` and `weight · value` of every prompt
    entry into its target slot, and the weight sums per slot (float32).

    `target` (`[B, H, m]`) is a slot of `index`; `weight` (`[B, H, m]`) is 0 for entries that join nothing.
    """
    keys, values = layer.keys.float(), layer.values.float()
    b, h, k = index.shape
    d = keys.shape[-1]
    slot = target.clamp(0, k - 1)
    sums = []
    for t in (keys, values):
        acc = torch.zeros(b, h, k, d, device=keys.device)
        sums.append(acc.scatter_add_(2, slot[..., None].expand_as(t), t * weight[..., None]))
    total = torch.zeros(b, h, k, device=keys.device).scatter_add_(2, slot, weight)
    gidx = index[..., None].expand(-1, -1, -1, d)
    return keys.gather(2, gidx), values.gather(2, gidx), sums[0], sums[1], total


@register(REDUCERS, "evict")
class Evict(Reducer):
    """Dropped keys are gone: the kept entries are gathered as they are."""


@register(REDUCERS, "merge_position")
class MergePosition(Reducer):
    """Elastic Cache (Liu et al., ECCV 2024, §3.3 "anchor point merging"): every dropped key joins the
    positionally nearest kept key (anchor), and each anchor becomes the plain mean of its bucket, itself
    included, for keys and values, per head.

    Between consecutive anchors `a < a'` the gap splits at `(a + a') // 2`: keys at or left of it join
    `a` (ties go left). Keys before the first anchor join it, keys after the last join the last. Padding
    joins nothing. Merging acts on post-RoPE keys; positions are not changed.
    """

    def reduce(
        self, layer: CompressedLayer, index: torch.Tensor, count: torch.Tensor, info: PromptInfo
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, m = layer.keys.shape[:3]
        kept = _kept(index, count)
        anchors = torch.where(kept, index, m)
        # the split after anchor i; 2m (past every key) where anchor i is the last
        mids = torch.where(kept[..., 1:], (anchors[..., :-1] + anchors[..., 1:]) // 2, 2 * m)
        pos = torch.arange(m, device=index.device).expand(b, h, m).contiguous()
        target = torch.searchsorted(mids.contiguous(), pos)  # number of splits strictly left of the key
        weight = info.key_valid[:, None].expand(b, h, m).float()
        _, _, k_sum, v_sum, n = _pool_into(layer, index, target, weight)
        n = n.clamp(min=1)[..., None]
        return k_sum / n, v_sum / n


@register(REDUCERS, "merge_similarity")
class MergeSimilarity(Reducer):
    """LOOK-M (Wan et al., EMNLP Findings 2024, §3.3 "KV pairs merging"): every dropped key joins the kept
    key of highest cosine similarity (keys only; values follow the same assignment); a kept key `c` with
    joined set `E` becomes, for keys and values alike:

    - `pivotal` (default, the paper's best): `(k_c + ½ Σ_{e∈E} (k_e + k_c)) / (|E| + 1)`;
    - `averaged`: `(k_c + Σ_{e∈E} k_e) / (|E| + 1)`;
    - `weighted`: `(k_c + Σ_{e∈E} w_e k_e) / (1 + Σ_{e∈E} w_e)` with `w_e` the raw cosine similarity,
      clamped at 0 (a negative weight would extrapolate away from the merged key).
    """

    MODES = ("pivotal", "averaged", "weighted")

    def __init__(self, mode: str = "pivotal") -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown merge mode {mode!r}; valid: {', '.join(self.MODES)}")
        self.mode = mode

    def reduce(
        self, layer: CompressedLayer, index: torch.Tensor, count: torch.Tensor, info: PromptInfo
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, m, d = layer.keys.shape
        kept = _kept(index, count)
        unit = F.normalize(layer.keys.float(), dim=-1)
        kept_unit = unit.gather(2, index[..., None].expand(-1, -1, -1, d))
        target = torch.empty(b, h, m, dtype=torch.long, device=index.device)
        cosine = torch.empty(b, h, m, device=index.device)
        for start in range(0, m, SIMILARITY_CHUNK):
            block = slice(start, start + SIMILARITY_CHUNK)
            sim = unit[:, :, block] @ kept_unit.transpose(-1, -2)
            best = sim.masked_fill(~kept[..., None, :], -torch.inf).max(-1)
            target[..., block], cosine[..., block] = best.indices, best.values
        # padding slots point past the prompt so they never mark key 0 as kept
        is_kept = torch.zeros(b, h, m + 1, dtype=torch.bool, device=index.device)
        is_kept.scatter_(2, torch.where(kept, index, m), True)
        dropped = ~is_kept[..., :m] & info.key_valid[:, None]
        weight = cosine.clamp(min=0) if self.mode == "weighted" else torch.ones_like(cosine)
        weight = torch.where(dropped, weight, 0.0)
        k_c, v_c, k_sum, v_sum, n = _pool_into(layer, index, target, weight)
        n = n[..., None]  # |E| (pivotal, averaged) or Σ w_e (weighted)
        if self.mode == "pivotal":
            return tuple((c * (1 + n / 2) + s / 2) / (n + 1) for c, s in ((k_c, k_sum), (v_c, v_sum)))
        return (k_c + k_sum) / (1 + n), (v_c + v_sum) / (1 + n)
