"""The compressed KV cache: a transformers `Cache` whose layers keep different numbers of entries per KV head
and per sequence, and report the logical length (tokens seen) apart from the physical entries.

Each layer stores `keys`/`values` as `[B, H_kv, capacity, D]`; entries `[0, length[b, h])` of each row are valid
and the rest is spare room. `positions[b, h, i]` is the original index (in the padded prompt, then counting
on through generated tokens) of entry `i`, so nothing is ever re-indexed: RoPE was applied at the original
position, and decoding continues from the original prompt length.

After `keep`, the storage is re-allocated at the largest kept count of the layer, so a smaller budget frees
real memory; spare room for generated tokens is added in chunks (`grow`).

The fast decode path may instead pack a layer raggedly (`reserve_ragged`): each sequence gets its own capacity
(its longest KV-head row plus room for generated tokens), the rows laid end to end along the token axis of
`keys`/`values` `[1, H_kv, T, D]`, `bounds[b]` the first token slot of sequence `b`. Policies that give each
sequence its own budget (VL-Cache) then allocate what they keep, not the batch's longest row `B` times.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

GROW_CHUNK = 64


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's entries. `compressed` turns true once a policy has chosen what to keep."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.length: torch.Tensor | None = None  # [B, H] valid entries per row
        self.positions: torch.Tensor | None = None  # [B, H, capacity] original index of each entry
        self.seen = 0  # logical tokens seen (padded prompt + generated), what positions count from
        self.compressed = False
        self.reserved = False  # `reserve` was called: appends neither reallocate nor read lengths back
        self.seen_device: torch.Tensor | None = None  # `seen` on the device while reserved (graph replays)
        self.bounds: torch.Tensor | None = None  # [B + 1] int64 row starts of the ragged layout; None: padded
        self._ragged_cap = 0  # largest row capacity of the ragged layout (a host int: split counts read it)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    # -- what transformers calls -------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stores new entries at each row's end and returns the whole buffers (attention masks by `length`)."""
        b, h, n, _ = key_states.shape
        self._padded_only("update")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self.length = torch.full((b, h), n, dtype=torch.long, device=key_states.device)
            self.positions = torch.arange(n, device=key_states.device).expand(b, h, n).clone()
            self.seen = n
            return self.keys, self.values
        if self.reserved:  # no host read-back: CUDA-graph safe (appending past the capacity is an error)
            seen = self.seen_device
        else:
            if int(self.length.max()) + n > self.capacity:
                self.grow(max(n, GROW_CHUNK))
            seen = self.seen
        slot = self.length[..., None] + torch.arange(n, device=self.device)  # [B, H, n]
        d_slot = slot[..., None].expand(-1, -1, -1, key_states.shape[-1])
        self.keys.scatter_(2, d_slot, key_states)
        self.values.scatter_(2, d_slot, value_states)
        self.positions.scatter_(2, slot, (seen + torch.arange(n, device=self.device)).expand(b, h, n))
        self.length += n
        if self.reserved:
            self.seen_device += n
        self.seen += n
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_max_length(self) -> int:
        return -1

    # -- what policies call ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Entries per row: the padded layout's token axis, or the ragged layout's largest row capacity."""
        if self.bounds is not None:
            return self._ragged_cap
        return 0 if self.keys is None else self.keys.shape[2]

    def _padded_only(self, what: str) -> None:
        """Raises for operations that index rows as `[B, H, capacity]` on a ragged layer (`reserve_ragged`)."""
        if self.bounds is not None:
            raise RuntimeError(
                f"CompressedLayer.{what}: the layer has the ragged layout (reserve_ragged); only the fused decode "
                "step (rope_append_attention / decode_attention with bounds) reads and appends to it"
            )

    def valid_mask(self) -> torch.Tensor:
        """`[B, H, capacity]` bool: which physical entries hold data."""
        self._padded_only("valid_mask")
        return torch.arange(self.capacity, device=self.device) < self.length[..., None]

    def grow(self, extra: int) -> None:
        self._padded_only("grow")
        b, h, cap, d = self.keys.shape
        pad = lambda t, *tail: torch.cat([t, t.new_zeros(b, h, extra, *tail)], dim=2)  # noqa: E731
        self.keys, self.values = pad(self.keys, d), pad(self.values, d)
        self.positions = torch.cat([self.positions, self.positions.new_full((b, h, extra), -1)], dim=2)

    def reserve(self, capacity: int) -> None:
        """Sizes the storage once to `capacity` entries per row (the fast decode path: max kept + new tokens).

        From then on `update` appends in place without reallocating or reading `length` back to the host, so a
        decode step can be captured in a CUDA graph; `seen_device` counts tokens on the device (a replayed
        graph does not run the Python `seen += n`: call `sync_seen` after replays).
        """
        self._padded_only("reserve")
        if capacity > self.capacity:
            self.grow(capacity - self.capacity)
        self.reserved = True
        self.seen_device = torch.tensor(self.seen, dtype=torch.long, device=self.device)

    def reserve_ragged(self, extra: int) -> None:
        """Re-packs the layer raggedly, sized once: sequence `b` gets `cap_b = max_h length[b, h] + extra` entries
        per KV head, so each sequence holds its own kept count plus room for `extra` generated tokens rather
        than the batch's longest row.

        `keys`/`values` become `[1, H, T, D]` and `positions` `[1, H, T]` (contiguous, `T = sum_b cap_b`): row
        `(b, h)` occupies token slots `[bounds[b], bounds[b + 1])` of head `h`, its valid entries first (in
        their order), then spare slots (zero, position -1). `length` stays `[B, H]`. As after `reserve`, appends
        (the fused step's `rope_append_attention`) write in place with no host reads; `update`, `keep`,
        `valid_mask` and the other `[B, H, capacity]` operations raise from then on.
        """
        self._padded_only("reserve_ragged")
        if self.capacity == 0:  # nothing kept anywhere: one spare slot to gather from (masked out below)
            self.grow(1)
        b, h, cap, d = self.keys.shape
        row_cap = self.length.amax(1) + extra  # [B]
        self.bounds = torch.cat([row_cap.new_zeros(1), row_cap.cumsum(0)])
        total, self._ragged_cap = (int(x) for x in torch.stack([self.bounds[-1], row_cap.max()]).tolist())
        # one gather over the packed token axis: slot t belongs to the row whose span holds it
        t = torch.arange(total, device=self.device)
        row = torch.searchsorted(self.bounds[1:], t, right=True)  # [T]
        local = t - self.bounds[row]  # [T] index within the row
        valid = local < self.length[row].T  # [H, T]
        src = local.clamp(max=cap - 1)
        keys, values = self.keys[row, :, src].transpose(0, 1), self.values[row, :, src].transpose(0, 1)  # [H, T, D]
        # zeroed spare slots, as `keep` leaves them: deterministic buffers (never read: lengths bound the rows)
        self.keys = torch.where(valid[..., None], keys, 0)[None].contiguous()
        self.values = torch.where(valid[..., None], values, 0)[None].contiguous()
        self.positions = torch.where(valid, self.positions[row, :, src].T, -1)[None].contiguous()
        self.reserved = True
        self.seen_device = torch.tensor(self.seen, dtype=torch.long, device=self.device)

    def sync_seen(self) -> None:
        """Copies the device token count back to `seen` (after graph replays)."""
        if self.seen_device is not None:
            self.seen = int(self.seen_device)

    def keep(
        self,
        index: torch.Tensor,
        count: torch.Tensor,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> None:
        """Keeps entries `index[b, h, :count[b, h]]` (in that order) and frees the rest.

        `keys`/`values` (`[B, H, K, D]`, aligned with `index`) replace the gathered entries when a merging
        reducer changed them. The new capacity is `K = index.shape[-1]`, the largest count of the layer.
        """
        self._padded_only("keep")
        d = self.keys.shape[-1]
        gidx = index[..., None].expand(-1, -1, -1, d)
        new_keys = keys if keys is not None else self.keys.gather(2, gidx)
        new_values = values if values is not None else self.values.gather(2, gidx)
        valid = torch.arange(index.shape[-1], device=self.device) < count[..., None]
        self.positions = torch.where(valid, self.positions.gather(2, index), -1)
        # zeroing the unused tail keeps the buffers deterministic (they are masked anyway)
        self.keys = torch.where(valid[..., None], new_keys, 0).to(self.dtype).contiguous()
        self.values = torch.where(valid[..., None], new_values, 0).to(self.dtype).contiguous()
        self.length = count.to(torch.long).clone()
        self.compressed = True

    def remove(self, index: torch.Tensor, active: torch.Tensor) -> None:
        """Deletes entry `index[b, h]` from every row where `active[b, h]`, shifting later entries left."""
        self._padded_only("remove")
        cap = self.capacity
        j = torch.arange(cap, device=self.device).expand(*index.shape, cap)
        src = torch.where(active[..., None] & (j >= index[..., None]), (j + 1).clamp(max=cap - 1), j)
        self.keys = self.keys.gather(2, src[..., None].expand_as(self.keys))
        self.values = self.values.gather(2, src[..., None].expand_as(self.values))
        self.positions = self.positions.gather(2, src)
        self.length = self.length - active.long()

    def drop_(self, start: torch.Tensor, count: torch.Tensor, *, chunks: int | None = None) -> None:
        """In place, graph-safe `remove`: deletes entries `[start[b, h], start[b, h] + count[b, h])` of each row
        (`count` 0: nothing), shifting later entries left within the fixed capacity, and decrements `length` in
        place.

        Fixed shapes and no host reads, and the storage is never re-allocated (a captured CUDA graph keeps
        pointing at it): what the fast decode path's per-token rules need. Entries keep their order, so the
        result equals `count` successive `remove(start, count > 0)` calls on the valid entries.

        On CUDA (or under `TRITON_INTERPRET=1`) a Triton kernel moves only the entries after `start`
        (`vlcache.kernels.rule_ops.shift_rows_`, `chunks` programs per row; slots past the new length
        may then hold other stale entries than here); else a gather of the whole buffer.
        """
        self._padded_only("drop_")
        from vlcache.kernels import rule_ops  # imports triton: only when dropping

        if rule_ops.supported(self.keys):
            rule_ops.shift_rows_(self.keys, self.values, self.positions, self.length, start, count, chunks=chunks)
            return
        cap = self.capacity
        j = torch.arange(cap, device=self.device)
        src = torch.where(j >= start[..., None], (j + count[..., None]).clamp(max=cap - 1), j)
        # gather into a temporary, then copy back: the source and destination rows overlap
        self.keys.copy_(self.keys.gather(2, src[..., None].expand_as(self.keys)))
        self.values.copy_(self.values.gather(2, src[..., None].expand_as(self.values)))
        self.positions.copy_(self.positions.gather(2, src))
        self.length.sub_(count.to(self.length.dtype))

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the physical storage, spare room included)."""
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def kept_bytes(self) -> int:
        """Bytes of the valid entries only."""
        if self.keys is None:
            return 0
        return 2 * int(self.length.sum()) * self.keys.shape[-1] * self.keys.element_size()


class CompressedCache(Cache):
    """A cache of `CompressedLayer`s, one per decoder layer of the language model."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[CompressedLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def kept_bytes(self) -> int:
        return sum(layer.kept_bytes() for layer in self.layers)

    def share_seen(self) -> torch.Tensor:
        """Makes every reserved layer's `seen_device` one tensor and returns it: a decode step that appends to all
        layers at once (vlcache/engine/fused_decode.py) advances it once, not once per layer."""
        seen = self.layers[0].seen_device
        for layer in self.layers:
            layer.seen_device = seen
        return seen

    def kept_counts(self) -> torch.Tensor:
        """`[L, B, H]` valid entries per layer, sequence and KV head."""
        return torch.stack([layer.length for layer in self.layers])
