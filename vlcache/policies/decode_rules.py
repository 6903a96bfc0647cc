"""Decode rules: what happens to the cache while tokens are generated (policies.md §2-3).

Rules that evict call `on_token` in every layer after the new token's entry was appended and attended, and
delete with `CompressedLayer.remove` (later entries shift left). At budget 1 they do nothing: a full budget
keeps everything, so every preset reproduces the uncompressed model there.

The fast decode path (vlcache/engine/fast_decode.py) captures a decode step in a CUDA graph, which `on_token`
cannot be part of (it re-allocates the storage and reads lengths on the host). Rules that evict per token
therefore also provide a graph-safe form of the same update: `prepare_static(cache)`, called once after the
cache was reserved (`CompressedLayer.reserve`), sizes the rule's state to the reserved buffers; then
`on_token_static` does what `on_token` does with fixed-shape device ops only, in place (`CompressedLayer.drop_`):
no `.item()`/`.tolist()`/`bool(tensor)`, no data-dependent shapes, no re-allocation, the token count read from
`seen_device`. Entries keep their order (deletion shifts later entries left, as `remove` does) where the rule's
semantics depend on it (Elastic's queue, StreamingLLM's consecutive positions). H2O's Triton form does not: it
finds its recent window by position and fills the victim's slot with the row's last entry, so a row's entries are
those of the PyTorch form in another order (which attention does not see).

On CUDA tensors (and CPU tensors under `TRITON_INTERPRET=1`) the graph-safe updates run as Triton kernels
(vlcache/kernels/rule_ops.py: one to three launches per layer instead of 15-35 PyTorch ops); the PyTorch form
below stays the fallback and the reference.
"""

from __future__ import annotations

import contextlib

import torch

from vlcache.cache import CompressedCache, CompressedLayer
from vlcache.engine.side_stream import SideUpdates
from vlcache.kernels import rule_ops
from vlcache.kernels.launch import on_device, sm_count
from vlcache.policies.parts import DECODE_RULES, DecodeRule, register
from vlcache.policies.rope import find_rotary, shift_rope


@register(DECODE_RULES, "append")
class Append(DecodeRule):
    """Generated tokens are appended and never evicted (the prefill-only form VLM papers compare against)."""


def _shift_out(t: torch.Tensor, index: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """`t` (`[B, H, cap]`) without slot `index[b, h]` where `active`, as `CompressedLayer.remove` does."""
    cap = t.shape[-1]
    j = torch.arange(cap, device=t.device).expand_as(t)
    src = torch.where(active[..., None] & (j >= index[..., None]), (j + 1).clamp(max=cap - 1), j)
    return t.gather(-1, src)


def _drop_block(t: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`t` (`[B, H, cap]`) without slots `[start, start + count)` of each row, as `CompressedLayer.drop_` does."""
    cap = t.shape[-1]
    j = torch.arange(cap, device=t.device)
    return t.gather(-1, torch.where(j >= start[..., None], (j + count[..., None]).clamp(max=cap - 1), j))


def decode_row_scores(query: torch.Tensor, keys: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """`[B, Hkv, cap]` float32: the decode query's attention over each row's first `length` entries, summed over
    the query heads of each KV head (what `kernels.attention_scores` returns as `col` for one decode row).

    Fixed shapes and no host reads (the scoring core's PyTorch fallback sizes its chunks on the host), in the
    fallback's order of operations: scale on q, float32 product, masked softmax, sum over the group.
    """
    b, h, cap, d = keys.shape
    q = query.float().reshape(b, h, query.shape[1] // h, d) * d**-0.5
    logits = torch.matmul(q, keys.float().transpose(-1, -2))  # [B, Hkv, group, cap]
    valid = torch.arange(cap, device=keys.device) < length[..., None]
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(2)


@register(DECODE_RULES, "h2o")
class H2O(DecodeRule):
    """H2O (Zhang et al., NeurIPS 2023, Algorithm 1, the official `H2OKVCache_LayerWise`): after each token,
    its attention row is added to every entry's running score; once the cache holds more than its prompt keep
    count `k`, the entry with the lowest score outside the sinks and the recent window is dropped, so the size
    stays `k`. The running scores start from the scorer's prefill scores of the kept entries.
    """

    acts_per_token = True

    def setup(self, cache, info, budget, keep_counts, *, scores=None, sinks=0, recent=None) -> None:
        self.active = budget < 1.0 and scores is not None
        if not self.active:
            return
        device = cache.layers[0].keys.device
        self.keep = keep_counts.to(device)
        self.sinks = sinks
        self.recent = recent.to(device) if recent is not None else torch.zeros_like(self.keep[:, :, 0])
        self.scores = [s.float().clone() for s in scores]  # each on its layer's device (device_map)

    def on_token(self, layer_idx: int, query: torch.Tensor, cache: CompressedCache) -> None:
        if not self.active:
            return
        from vlcache import kernels  # the scoring core, looked up per call (tests swap the backend)

        layer = cache.layers[layer_idx]
        b, h, cap, d = layer.keys.shape
        s = self.scores[layer_idx]
        if s.shape[-1] < cap:  # the cache grew: new slots start at 0
            s = torch.cat([s, s.new_zeros(b, h, cap - s.shape[-1])], -1)
        # one decode row per KV head: (B, Hkv) folded into the batch makes each head's valid entries key_valid
        group = query.shape[1] // h
        q = query.reshape(b * h, group, 1, d)
        with on_device(q):
            row = kernels.attention_scores(
                q,
                layer.keys.reshape(b * h, 1, cap, d),
                torch.full((b * h, 1), cap - 1, device=q.device),
                key_valid=layer.valid_mask().reshape(b * h, cap),
            ).col.reshape(b, h, cap)
        s = s + row
        over = layer.length > self.keep[layer_idx].to(layer.length.device)
        if bool(over.any()):
            slot = torch.arange(cap, device=s.device)
            n = layer.length[..., None]
            first = min(self.sinks, cap - 1)
            recent = self.recent[layer_idx][:, None, None].to(s.device)
            candidate = (slot >= first) & (slot < n - recent)
            victim = torch.where(candidate, s, torch.inf).argmin(-1)
            # no candidate (the protected tokens fill the cache): drop the oldest non-sink entry
            oldest = (layer.length - 1).clamp(max=first)
            victim = torch.where(candidate.any(-1), victim, oldest)
            layer.remove(victim, over)
            s = _shift_out(s, victim, over)
        live = torch.arange(cap, device=s.device) < layer.length[..., None]
        self.scores[layer_idx] = torch.where(live, s, 0.0)  # freed slots restart at 0 for the next token

    overlap = True  # the fast path asks for the update on a side stream (`prepare_static(overlap=True)`)
    side: SideUpdates | None = None

    def prepare_static(self, cache: CompressedCache, overlap: bool = False) -> None:
        """Graph-safe form, step 1: scores padded to the reserved capacity once (new slots start at 0, as the
        growth in `on_token` does), and per-layer copies of the keep counts and windows on each layer's
        device (no copies inside the captured step). `overlap`: where the Triton form runs on one GPU, each
        layer's update runs on a side stream beside the step's next layers (vlcache/engine/side_stream.py), and
        `on_step_static` joins them; the caller must call it at the end of every step."""
        if not self.active:
            return
        self.static_keep, self.static_recent, self.static_window = [], [], []
        self.static_scratch = None  # the Triton form's buffers, made at the first update (the group is known there)
        self.logits_from = None  # the layer whose attention wrote the logits (`attention_logits`)
        self._layers = cache.layers
        keys = cache.layers[0].keys
        one_gpu = keys.is_cuda and all(layer.keys.device == keys.device for layer in cache.layers)
        self.side = None
        if overlap and one_gpu and rule_ops.supported(keys):
            self.side = SideUpdates(keys.device, len(cache.layers), copies=2)
        for layer_idx, layer in enumerate(cache.layers):
            s = self.scores[layer_idx]
            b, h, k = s.shape
            s = torch.cat([s, s.new_zeros(b, h, max(layer.capacity - k, 0))], -1)
            live = torch.arange(s.shape[-1], device=s.device) < layer.length[..., None].to(s.device)
            self.scores[layer_idx] = torch.where(live, s, 0.0)  # new slots start at 0
            self.static_keep.append(self.keep[layer_idx].to(layer.device))
            self.static_recent.append(self.recent[layer_idx].to(layer.device)[:, None, None])
            # the Triton form's recent window, by position (its entries do not keep their order)
            self.static_window.append(
                rule_ops.h2o_window(layer.positions, layer.length, self.static_recent[-1], layer.seen)
            )

    def attention_logits(self, layer_idx: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Buffers for the fused step's attention to write this layer's logits into
        (`rope_append_attention(logits=...)`), so `on_token_static` need not read the keys again; None where the
        PyTorch form runs."""
        layer = self._static_layer(layer_idx)
        if layer is None:
            return None
        scratch = self._scratch(num_heads // layer.keys.shape[1], layer_idx)
        self.logits_from = layer_idx
        if self.side is not None:  # the buffers' previous reader, on the side stream, is done first
            self.side.before(layer_idx)
        return scratch.logits, scratch.lse

    def _static_layer(self, layer_idx: int):
        layers = getattr(self, "_layers", None)
        if not self.active or layers is None or not rule_ops.supported(layers[layer_idx].keys):
            return None
        return layers[layer_idx]

    def _scratch(self, group: int, layer_idx: int) -> rule_ops.RuleScratch:
        if self.static_scratch is None:  # the fast path's first step runs eagerly, before the capture
            # side 0: H2O moves one entry and never shifts, so its launches read no side buffers (only the logits
            # and the partials)
            self.static_scratch = rule_ops.RuleScratch.for_layers(
                self._layers, side=0, group=group, copies=1 if self.side is None else self.side.copies
            )
        return self.static_scratch[layer_idx]

    def on_step_static(self, cache: CompressedCache) -> None:
        """The end of a decode step: the current stream waits for the updates forked onto the side stream."""
        if self.active and self.side is not None:
            self.side.join()

    def on_token_static(self, layer_idx: int, query: torch.Tensor, cache: CompressedCache) -> None:
        """Graph-safe `on_token` (H2O, Zhang et al. 2023, Algorithm 1): the same running scores and victim,
        computed for every row and applied where the row is over its keep count (`count` 0 elsewhere) instead
        of behind a host-side `any()`; scores and entries updated in place. On CUDA (`rule_ops.h2o_step_`) the
        victim's slot takes the row's last entry instead of the later entries shifting left, and the logits come
        from the fused step's attention where it wrote them (`attention_logits`).

        `first = min(sinks, cap - 1)` with the reserved capacity gives the eager value: the capacity is at
        least `max keep + 2` on both paths while rows never exceed `keep + 1` entries, so the clamp only binds
        where it yields `n - 1` on both.
        """
        if not self.active:
            return
        layer = cache.layers[layer_idx]
        cap = layer.capacity
        s = self.scores[layer_idx]
        first = min(self.sinks, cap - 1)
        if rule_ops.supported(layer.keys):  # the same update in one to three launches, the entries unordered
            scratch = self._scratch(query.shape[1] // layer.keys.shape[1], layer_idx)
            given, self.logits_from = self.logits_from == layer_idx, None
            side = self.side.fork(layer_idx, query) if self.side is not None else contextlib.nullcontext()
            with side:
                rule_ops.h2o_step_(
                    query,
                    layer.keys,
                    layer.values,
                    layer.positions,
                    layer.length,
                    s,
                    self.static_keep[layer_idx],
                    self.static_recent[layer_idx],
                    self.static_window[layer_idx],
                    first,
                    scratch,
                    from_attention=given,
                )
            return
        s.add_(decode_row_scores(query, layer.keys, layer.length))
        n = layer.length[..., None]
        slot = torch.arange(cap, device=s.device)
        candidate = (slot >= first) & (slot < n - self.static_recent[layer_idx])
        victim = torch.where(candidate, s, torch.inf).argmin(-1)
        # no candidate (the protected tokens fill the cache): drop the oldest non-sink entry
        victim = torch.where(candidate.any(-1), victim, (layer.length - 1).clamp(max=first))
        count = (layer.length > self.static_keep[layer_idx]).long()
        s.copy_(_drop_block(s, victim, count))
        layer.drop_(victim, count)
        s.masked_fill_(slot >= layer.length[..., None], 0.0)  # freed slots restart at 0 for the next token


@register(DECODE_RULES, "fixed_point")
class FixedPoint(DecodeRule):
    """Elastic Cache (Liu et al., ECCV 2024, §3.4 "fixed-point elimination"): the budget covers every token
    seen (prompt and generated).

    After prefill, the truncation index `N_tl = (compressed prompt length) − recent_distance` is fixed (24:
    the paper's "recent distance of 25"). After each generated token, while the cache holds more than
    `ceil(budget · tokens_seen)` entries, the entry at `N_tl` is deleted: the merged prefix before it is
    permanent, the tail behaves as a queue.
    """

    acts_per_token = True

    def __init__(self, recent_distance: int = 24) -> None:
        if recent_distance < 0:
            raise ValueError(f"recent_distance must be >= 0, got {recent_distance}")
        self.recent_distance = recent_distance

    def setup(self, cache, info, budget, keep_counts, **_) -> None:
        self.active = budget < 1.0
        device = cache.layers[0].keys.device
        self.budget, self.info = budget, info
        self.n_tl = (keep_counts.to(device) - self.recent_distance).clamp(min=0)
        self.layer_offsets = None  # prepare_static's, where one launch can reach every layer

    def limit(self, layer: CompressedLayer) -> torch.Tensor:
        """`[B]` `ceil(budget · tokens_seen)`; the epsilon keeps float error from rounding an integer up."""
        seen = (self.info.lengths + (layer.seen - self.info.m)).double()
        return torch.ceil(self.budget * seen - 1e-9).long()

    def on_token(self, layer_idx: int, query: torch.Tensor, cache: CompressedCache) -> None:
        if not self.active:
            return
        layer = cache.layers[layer_idx]
        limit = self.limit(layer)[:, None].to(layer.length.device)
        index = torch.minimum(self.n_tl[layer_idx].to(layer.length.device), layer.length - 1)
        while bool((over := layer.length > limit).any()):
            layer.remove(index, over)
            index = torch.minimum(index, layer.length - 1)

    def prepare_static(self, cache: CompressedCache) -> None:
        """Graph-safe form, step 1: the prompt lengths and `N_tl` on each layer's device."""
        if not self.active:
            return
        self.static_lengths = [self.info.lengths.to(layer.device) for layer in cache.layers]
        self.static_n_tl = [self.n_tl[i].to(layer.device) for i, layer in enumerate(cache.layers)]
        # the Triton form's float64 [budget, eps] (a float argument would reach the kernel as float32)
        self.static_consts = [
            torch.tensor([self.budget, 1e-9], dtype=torch.float64, device=layer.device) for layer in cache.layers
        ]
        # every layer's deletions in one launch at the step's end (`on_step_static`) where one set of strides
        # reaches all layers' buffers (as reserved now: they do not move while decoding), and where a layer's rows
        # do not fill the GPU alone: on an H200 one launch for 32 layers took 13 against 90 µs a step at batch 1
        # (8 rows a layer), but 970 against 345 at batch 64 (512 rows a layer; bench_rules.py,
        # results/bench/rules_fp_layers_h200.json)
        self.layer_offsets = None
        keys = cache.layers[0].keys
        if rule_ops.supported(keys) and keys.shape[0] * keys.shape[1] < sm_count(keys.device):
            per_layer = [[getattr(layer, kind) for layer in cache.layers] for kind in ("keys", "values", "positions",
                         "length")] + [self.static_n_tl, [layer.seen_device for layer in cache.layers]]  # fmt: skip
            self.layer_bases = tuple(ts[0] for ts in per_layer)  # what the offsets count from
            self.layer_offsets = rule_ops.layer_offsets(*per_layer)

    def on_token_static(self, layer_idx: int, query: torch.Tensor, cache: CompressedCache) -> None:
        """Graph-safe `on_token` (Elastic Cache, Liu et al. 2024, fixed-point elimination): the eager loop's
        deletions as one block, so no host-side `while`.

        The loop deletes at `index = min(N_tl, n - 1)` until the row holds `limit` entries, re-clamping the
        index to the new end: with `e = n - limit` deletions that is the contiguous block
        `[min(index, n - e), ... + e)` (the `e` entries from `N_tl` on, or the last `e` when fewer follow it).
        The token count comes from `seen_device` (a replayed graph does not advance the Python `seen`).
        """
        if not self.active:
            return
        layer = cache.layers[layer_idx]
        if self._batched(layer.keys):  # on_step_static does it for every layer
            return
        if rule_ops.supported(layer.keys):  # the same arithmetic and deletion in one launch
            rule_ops.drop_fixed_point_(
                layer.keys,
                layer.values,
                layer.positions,
                layer.length,
                self.static_n_tl[layer_idx],
                self.static_lengths[layer_idx],
                layer.seen_device,
                self.info.m,
                self.static_consts[layer_idx],
            )
            return
        seen = (self.static_lengths[layer_idx] + (layer.seen_device - self.info.m)).double()
        limit = torch.ceil(self.budget * seen - 1e-9).long()[:, None]
        n = layer.length
        excess = (n - limit).clamp(min=0)
        index = torch.minimum(self.static_n_tl[layer_idx], n - 1)
        layer.drop_(torch.minimum(index, n - excess).clamp(min=0), excess)

    def _batched(self, keys: torch.Tensor) -> bool:
        return self.layer_offsets is not None and rule_ops.supported(keys)

    def on_step_static(self, cache: CompressedCache) -> None:
        """After a decode step's last layer (the fast path's `ForwardContext.on_step`): `on_token_static` for every
        layer in one launch (`rule_ops.drop_fixed_point_layers_`), where `prepare_static` found one set of strides
        for all layers. Equal to the per-layer calls, which run right after each layer's attention: nothing reads
        a layer's cache between its attention and the step's end. Saves a launch per layer and step (0.1 ms a step
        for a 32-layer model)."""
        if not self.active or not self._batched(cache.layers[0].keys):
            return
        rule_ops.drop_fixed_point_layers_(
            self.layer_bases, self.layer_offsets, self.static_lengths[0], self.info.m, self.static_consts[0]
        )


@register(DECODE_RULES, "rolling")
class Rolling(DecodeRule):
    """StreamingLLM as published (Xiao et al., ICLR 2024, §3.2; mit-han-lab/streaming-llm `pos_shift`): the
    cache stays at its prompt keep count `k` by evicting the oldest non-sink entry after each token, and
    positions are those inside the cache, not in the text.

    RoPE only sees position differences, so "entries at `0..n−1`, the query at `n−1`" is realised as
    entries at consecutive positions ending at the query's own position (the engine keeps feeding the
    original one): after compression every kept key is rotated to `len − k + i` (slot `i`); evicting an
    entry leaves the later ones consecutive, and the sinks move up by one per token. Sinks are re-rotated
    from their original keys (kept in float32), so no rounding accumulates over a long generation.
    """

    acts_per_token = True

    def bind(self, adapter) -> None:
        cfg = adapter.text_config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if "mrope_section" in rope:  # Qwen2-VL's 3-D positions: the position of an entry is not one number
            raise NotImplementedError("decode=rolling supports 1-D RoPE only (not M-RoPE)")
        self.rotary = find_rotary(adapter.model)

    def setup(self, cache, info, budget, keep_counts, *, sinks=0, **_) -> None:
        self.active = budget < 1.0
        if not self.active:
            return
        if not hasattr(self, "rotary"):
            raise RuntimeError("decode=rolling needs the model's RoPE: call Policy.bind(adapter) first")
        self.info, self.sinks = info, sinks
        device = cache.layers[0].keys.device
        self.keep = keep_counts.to(device)
        self.base = info.lengths.to(device)[:, None] - self.keep  # [L, B, H]: the position of slot 0
        self.sink_keys, self.sink_pos = [], []
        for layer_idx, layer in enumerate(cache.layers):
            slot = torch.arange(layer.capacity, device=device)
            valid = slot < layer.length[..., None]
            original = layer.positions - info.pad.to(device)[:, None, None]  # RoPE position of each entry
            delta = torch.where(valid, self.base[layer_idx][..., None] + slot - original, 0)
            s = min(sinks, layer.capacity)
            self.sink_keys.append(layer.keys[:, :, :s].float().clone())
            self.sink_pos.append(original[:, :, :s].clone())
            layer.keys = shift_rope(layer.keys.float(), delta, self.rotary).to(layer.dtype)

    def on_token(self, layer_idx: int, query: torch.Tensor, cache: CompressedCache) -> None:
        if not self.active:
            return
        layer = cache.layers[layer_idx]
        over = layer.length > self.keep[layer_idx]
        layer.remove(torch.minimum(torch.full_like(layer.length, self.sinks), layer.length - 1), over)
        s = self.sink_keys[layer_idx].shape[2]
        if s == 0:
            return
        steps = layer.seen - self.info.m  # tokens generated so far, this one included
        slot = torch.arange(s, device=layer.keys.device)
        target = self.base[layer_idx][..., None] + slot + steps
        moved = shift_rope(self.sink_keys[layer_idx], target - self.sink_pos[layer_idx], self.rotary)
        keep = (slot < torch.minimum(layer.length, self.keep[layer_idx])[..., None])[..., None]
        layer.keys[:, :, :s] = torch.where(keep, moved.to(layer.dtype), layer.keys[:, :, :s])

    def prepare_static(self, cache: CompressedCache) -> None:
        """Graph-safe form, step 1: the per-layer state on each layer's device."""
        if not self.active:
            return
        devices = [layer.device for layer in cache.layers]
        self.static_keep = [self.keep[i].to(d) for i, d in enumerate(devices)]
        self.static_base = [self.base[i].to(d)[..., None] for i, d in enumerate(devices)]
        self.static_sinks = [torch.full_like(layer.length, self.sinks) for layer in cache.layers]
        # the Triton form's side buffers (else allocated per call, e.g. where the kernels were not on at reserve)
        supported = rule_ops.supported(cache.layers[0].keys)
        self.static_scratch = rule_ops.RuleScratch.for_layers(cache.layers, side=1) if supported else None

    def on_token_static(self, layer_idx: int, query: torch.Tensor, cache: CompressedCache) -> None:
        """Graph-safe `on_token` (StreamingLLM, Xiao et al. 2024, rolling cache): the oldest non-sink entry
        deleted by an in-place shift (order matters here: slot `i` sits at position `base + i`, so the later
        entries must stay consecutive), then the sinks re-rotated from their float32 originals to the next
        positions, written in place; the step count comes from `seen_device`."""
        if not self.active:
            return
        layer = cache.layers[layer_idx]
        if rule_ops.supported(layer.keys):  # the deletion in one launch (two at long rows)
            rule_ops.drop_oldest_(
                layer.keys,
                layer.values,
                layer.positions,
                layer.length,
                self.static_keep[layer_idx],
                self.sinks,
                scratch=self.static_scratch and self.static_scratch[layer_idx],
            )
        else:
            over = (layer.length > self.static_keep[layer_idx]).long()
            layer.drop_(torch.minimum(self.static_sinks[layer_idx], layer.length - 1), over)
        s = self.sink_keys[layer_idx].shape[2]
        if s == 0:  # a Python int (the sink count), not a tensor value
            return
        steps = layer.seen_device - self.info.m  # tokens generated so far, this one included
        slot = torch.arange(s, device=layer.keys.device)
        target = self.static_base[layer_idx] + slot + steps
        moved = shift_rope(self.sink_keys[layer_idx], target - self.sink_pos[layer_idx], self.rotary)
        keep = (slot < torch.minimum(layer.length, self.static_keep[layer_idx])[..., None])[..., None]
        layer.keys[:, :, :s] = torch.where(keep, moved.to(layer.dtype), layer.keys[:, :, :s])
