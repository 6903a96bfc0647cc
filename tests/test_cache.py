"""The compressed cache: keep, per-row lengths, logical vs physical length, appends, removal, real memory."""

import pytest
import torch

from vlcache.cache import CompressedCache, CompressedLayer


def _prefilled(b=2, h=3, m=11, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = CompressedLayer()
    k, v = torch.randn(b, h, m, d, generator=g), torch.randn(b, h, m, d, generator=g)
    layer.update(k, v)
    return layer, k, v


def test_prefill_then_keep_gathers_rows_and_frees_memory():
    layer, k, v = _prefilled()
    assert layer.get_seq_length() == 11 and layer.capacity == 11
    full_bytes = layer.nbytes()
    g = torch.Generator().manual_seed(1)
    count = torch.tensor([[3, 5, 4], [2, 5, 1]])
    index = torch.stack([torch.stack([torch.randperm(11, generator=g)[:5].sort().values for _ in range(3)])
                         for _ in range(2)])
    layer.keep(index, count)
    assert layer.capacity == 5 and layer.nbytes() == full_bytes * 5 // 11
    assert torch.equal(layer.length, count)
    for b in range(2):
        for h in range(3):
            c = int(count[b, h])
            assert torch.equal(layer.keys[b, h, :c], k[b, h, index[b, h, :c]])
            assert torch.equal(layer.values[b, h, :c], v[b, h, index[b, h, :c]])
            assert torch.equal(layer.positions[b, h, :c], index[b, h, :c])
            assert (layer.positions[b, h, c:] == -1).all()
    # the logical length (tokens seen) is what positions count from, whatever is kept
    assert layer.get_seq_length() == 11
    assert int(layer.valid_mask().sum()) == int(count.sum())


def test_append_writes_each_row_at_its_own_end_and_grows():
    layer, _, _ = _prefilled(b=2, h=2, m=7)
    count = torch.tensor([[2, 3], [1, 4]])
    layer.keep(torch.arange(4).expand(2, 2, 4).clone(), count)
    for step in range(70):  # past the capacity: it must grow
        new_k = torch.full((2, 2, 1, 5), float(step))
        keys, _ = layer.update(new_k, -new_k)
        assert keys.shape[2] == layer.capacity
    assert torch.equal(layer.length, count + 70)
    assert layer.get_seq_length() == 7 + 70
    for b in range(2):
        for h in range(2):
            c = int(count[b, h])
            assert torch.equal(layer.keys[b, h, c : c + 70, 0], torch.arange(70.0))
            assert torch.equal(layer.positions[b, h, c : c + 70], torch.arange(7, 77))


def test_remove_shifts_left_only_active_rows():
    layer, k, _ = _prefilled(b=1, h=2, m=6)
    layer.keep(torch.arange(6).expand(1, 2, 6).clone(), torch.tensor([[6, 6]]))
    layer.remove(torch.tensor([[2, 4]]), torch.tensor([[True, False]]))
    assert torch.equal(layer.length, torch.tensor([[5, 6]]))
    assert torch.equal(layer.positions[0, 0, :5], torch.tensor([0, 1, 3, 4, 5]))
    assert torch.equal(layer.keys[0, 0, :5], k[0, 0, [0, 1, 3, 4, 5]])
    assert torch.equal(layer.positions[0, 1], torch.arange(6))


def test_cache_totals():
    cache = CompressedCache(3)
    for layer in cache.layers:
        layer.update(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))
    cache.layers[1].keep(torch.arange(4).expand(1, 2, 4).clone(), torch.tensor([[4, 2]]))
    assert cache.kept_counts().tolist() == [[[8, 8]], [[4, 2]], [[8, 8]]]
    assert cache.kept_bytes() == 2 * (16 + 6 + 16) * 4 * 4
    assert cache.get_seq_length() == 8


def test_reserve_ragged_packs_each_sequence_at_its_own_capacity():
    """`reserve_ragged`: sequence b gets its longest row + `extra` slots, packed end to end; every valid entry and
    its position is kept, the spare slots are empty, and the storage is what the sequences' own capacities need."""
    layer, _, _ = _prefilled(b=3, h=2, m=9, d=5)
    g = torch.Generator().manual_seed(2)
    count = torch.tensor([[9, 3], [0, 0], [2, 5]])  # a full row, an empty sequence, differing rows
    index = torch.stack([torch.stack([torch.randperm(9, generator=g) for _ in range(2)]) for _ in range(3)])
    layer.keep(index, count)
    keys, values, positions = layer.keys.clone(), layer.values.clone(), layer.positions.clone()
    kept_bytes = layer.kept_bytes()
    layer.reserve_ragged(4)
    caps = [9 + 4, 0 + 4, 5 + 4]
    assert layer.bounds.tolist() == [0, 13, 17, 26] and layer.bounds.dtype == torch.long
    assert layer.capacity == 13  # the largest row capacity (split counts)
    assert layer.keys.shape == (1, 2, 26, 5) and layer.positions.shape == (1, 2, 26) and layer.keys.is_contiguous()
    assert layer.nbytes() == 2 * sum(caps) * 2 * 5 * layer.keys.element_size()
    assert layer.kept_bytes() == kept_bytes and torch.equal(layer.length, count)
    for b in range(3):
        lo, hi = int(layer.bounds[b]), int(layer.bounds[b + 1])
        for h in range(2):
            c = int(count[b, h])
            assert torch.equal(layer.keys[0, h, lo : lo + c], keys[b, h, :c])
            assert torch.equal(layer.values[0, h, lo : lo + c], values[b, h, :c])
            assert torch.equal(layer.positions[0, h, lo : lo + c], positions[b, h, :c])
            assert (layer.positions[0, h, lo + c : hi] == -1).all() and (layer.keys[0, h, lo + c : hi] == 0).all()
    assert layer.reserved and int(layer.seen_device) == layer.seen == 9
    # only the fused step's kernels know the layout: the [B, H, capacity] operations refuse it
    for call in (
        layer.valid_mask,
        lambda: layer.update(torch.zeros(3, 2, 1, 5), torch.zeros(3, 2, 1, 5)),
        lambda: layer.keep(index, count),
        lambda: layer.grow(1),
        lambda: layer.reserve(20),
        lambda: layer.reserve_ragged(1),
    ):
        with pytest.raises(RuntimeError, match="ragged"):
            call()


def test_reserve_ragged_of_an_empty_layer():
    layer, _, _ = _prefilled(b=2, h=2, m=4)
    layer.keep(torch.zeros(2, 2, 0, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert layer.capacity == 0
    layer.reserve_ragged(3)
    assert layer.bounds.tolist() == [0, 3, 6] and layer.keys.shape == (1, 2, 6, 5)
    assert (layer.positions == -1).all() and (layer.keys == 0).all()
