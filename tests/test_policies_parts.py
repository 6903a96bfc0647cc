"""The policy parts (policies.md §3, §5) on fresh random attention inputs, against float64 definitions.

Every case draws its own post-RoPE queries and keys (GQA, left padding, batch > 1, odd lengths), runs the
policy as the engine does (one observer call per layer, then `compress`), and checks what was kept against a
direct float64 computation of the formula in policies.md. "Is a top-k" checks allow for exact ties (max
pooling makes plateaus): every key chosen by score must score at least as much as every valid key left out.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from vlcache import kernels
from vlcache.cache import CompressedCache, CompressedLayer
from vlcache.models.prompt import PromptInfo
from vlcache.policies.allocators import Pyramid, Sparsity
from vlcache.policies.policy import build_policy
from vlcache.policies.reducers import MergePosition, MergeSimilarity

D = 8
TOL = 1e-5


@pytest.fixture(autouse=True)
def torch_scoring_core(monkeypatch):
    """The PyTorch form of the scoring core: same semantics as the kernel (tests/test_scores.py checks them
    against each other), and seconds instead of minutes under TRITON_INTERPRET=1."""
    torch_core = functools.partial(kernels.attention_scores, backend="torch")
    monkeypatch.setattr(kernels, "attention_scores", torch_core)


# -- helpers ---------------------------------------------------------------------------------------
def make_info(lengths: list[int], images: list[tuple[int, int]] | None = None) -> PromptInfo:
    """A left-padded batch; `images[b] = (start, end)`: image tokens in sequence b's unpadded indices."""
    m = max(lengths)
    pad = torch.tensor([m - n for n in lengths])
    idx = torch.arange(m)
    key_valid = idx >= pad[:, None]
    image_mask = torch.zeros(len(lengths), m, dtype=torch.bool)
    for b, (s, e) in enumerate(images or []):
        image_mask[b, pad[b] + s: pad[b] + e] = True
    last = torch.where(image_mask, idx, -1).amax(1)
    start = torch.where(last >= 0, last + 1, pad)
    return PromptInfo(key_valid=key_valid, image_mask=image_mask, postvision_start=start)


def random_layers(gen, layers, batch, hq, hkv, m, spread=2.0):
    """Per layer (q [B,Hq,m,D], k, v [B,Hkv,m,D]); `spread` sharpens the attention."""
    out = []
    for _ in range(layers):
        q = torch.randn(batch, hq, m, D, generator=gen) * spread
        k = torch.randn(batch, hkv, m, D, generator=gen)
        v = torch.randn(batch, hkv, m, D, generator=gen)
        out.append((q, k, v))
    return out


def cfg(scorer, allocator=None, reducer=None, decode=None, **kw) -> dict:
    return dict(name="test", scorer=scorer, allocator=allocator or {"name": "uniform"},
                reducer=reducer or {"name": "evict"}, decode=decode or {"name": "append"}, **kw)


def run(policy_cfg: dict, budget: float, info: PromptInfo, data):
    """Prefill (observer per layer) and compress, as the engine does; returns (policy, cache, report)."""
    policy = build_policy(policy_cfg, budget)
    observe = policy.begin(info, len(data))
    cache = CompressedCache(len(data))
    for layer_idx, (q, k, v) in enumerate(data):
        cache.layers[layer_idx].update(k.clone(), v.clone())
        if observe is not None:
            observe(layer_idx, q, k)
    return policy, cache, policy.compress(cache)


def dense_probs(q, k, info: PromptInfo) -> torch.Tensor:
    """`[B, Hq, m, m]` float64 `softmax(q kᵀ/√D)` with the causal and padding mask; padded rows are zero."""
    group = q.shape[1] // k.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(group, 1)) * D**-0.5
    m = info.m
    vis = torch.ones(m, m, dtype=torch.bool).tril() & info.key_valid[:, None, :] & info.key_valid[:, :, None]
    probs = torch.softmax(logits.masked_fill(~vis[:, None], -torch.inf), -1)
    return torch.nan_to_num(probs, nan=0.0)


def group_sum(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """Sums the query heads of each KV group: `[B, Hq, ...]` → `[B, Hkv, ...]`."""
    return x.reshape(x.shape[0], hkv, -1, *x.shape[2:]).sum(2)


def kept_positions(cache: CompressedCache, layer: int, b: int, h: int) -> set[int]:
    lay = cache.layers[layer]
    return set(lay.positions[b, h, : lay.length[b, h]].tolist())


def assert_topk(kept: set[int], forced: set[int], score: torch.Tensor, valid: torch.Tensor, n_scored: int):
    """`kept` = `forced` plus a top-`n_scored` of the other valid keys by `score` (ties allowed)."""
    assert forced <= kept
    chosen = kept - forced
    assert len(chosen) == n_scored
    others = [j for j in range(len(score)) if valid[j] and j not in kept]
    if chosen and others:
        assert min(score[j] for j in chosen) >= max(score[j] for j in others) - TOL


# -- H2O: causal column sums over every prompt row -------------------------------------------------
@pytest.mark.parametrize("core", ["torch", "dispatch"])
def test_accumulated_scores_are_causal_column_sums(monkeypatch, core):
    if core == "dispatch":  # the real entry point (Triton under TRITON_INTERPRET=1), on a small case
        monkeypatch.setattr(kernels, "attention_scores", kernels.scores.attention_scores)
    gen = torch.Generator().manual_seed(1)
    info = make_info([29, 23])
    data = random_layers(gen, 1, 2, 4, 2, info.m)
    policy, _, _ = run(cfg({"name": "accumulated"}, recent=0.5), 0.4, info, data)
    q, k, _ = data[0]
    got = policy.scorer.score(0, policy.stats[0], info).double()
    probs = dense_probs(q, k, info)
    want = group_sum(probs.sum(2), 2)
    valid = info.key_valid[:, None].expand_as(got)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-5)
    # the "last block only" reimplementation (causal mask on the last w rows only) gives other scores
    w, m = 8, info.m
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(2, 1)) * D**-0.5
    mask = info.key_valid[:, None, None, :].expand(-1, 1, m, m).clone()
    mask[..., m - w:, :] &= torch.ones(m, m, dtype=torch.bool).tril()[m - w:]
    buggy = group_sum(torch.softmax(logits.masked_fill(~mask, -torch.inf), -1).sum(2), 2)
    assert (buggy - want).abs().max() > 0.1


# -- SnapKV / PyramidKV ----------------------------------------------------------------------------
def pyramid_reference(m: int, c: int, w: int, layers: int, beta: int = 20) -> list[int]:
    """policies.md §3 pyramidkv, written out."""
    if c >= m:
        return [m] * layers
    if m < 2 * (c - w):
        return [c] * layers
    low = (c - w) // beta
    high = 2 * (c - w) - low
    if high >= m - w:
        high = m - w
        low = 2 * (c - w) - high
    step = (high - low) // (layers - 1)
    return [high - layer * step + w for layer in range(layers)]


def test_pyramid_example_and_edges():
    counts = Pyramid(window=8, beta=20).counts(4000, 128 / 4000, 32).tolist()
    assert counts[0] == 234 + 8 and counts[-1] == 17 + 8
    assert counts == pyramid_reference(4000, 128, 8, 32)
    assert all(a - b == 7 for a, b in zip(counts, counts[1:]))
    assert Pyramid(window=8).counts(300, 1.0, 32).tolist() == [300] * 32  # budget 1: everything
    assert Pyramid(window=8).counts(150, 0.6, 4).tolist() == [90] * 4  # m < 2(C - w): uniform C
    capped = Pyramid(window=8).counts(200, 0.54, 5).tolist()  # max >= m - w: capped at m - w
    assert capped == pyramid_reference(200, 108, 8, 5) == [200, 154, 108, 62, 16]


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
@pytest.mark.parametrize("allocator", ["uniform", "pyramid"])
def test_window_scorer_kept_indices_match_float64(pooling, allocator):
    gen = torch.Generator().manual_seed(2)
    w, kernel, layers = 6, 5, 3
    info = make_info([91, 77])
    data = random_layers(gen, layers, 2, 6, 2, info.m)
    alloc = {"name": "pyramid", "window": w, "beta": 20} if allocator == "pyramid" else {"name": "uniform"}
    scorer = {"name": "window", "window": w, "pooling": pooling, "kernel": kernel}
    budget = 0.3
    _, cache, report = run(cfg(scorer, alloc, recent=w), budget, info, data)
    m = info.m
    for layer, (q, k, _) in enumerate(data):
        votes = group_sum(dense_probs(q, k, info)[:, :, m - w:].sum(2), 2)  # [B, Hkv, m]
        votes[..., m - w:] = 0.0
        pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
        pooled = pool(votes.reshape(-1, 1, m), kernel, 1, kernel // 2).reshape(votes.shape)
        for b in range(2):
            n = int(info.lengths[b])
            c = round(budget * n)
            want = pyramid_reference(n, c, w, layers)[layer] if allocator == "pyramid" else c
            window = set(range(m - w, m))
            for h in range(2):
                kept = kept_positions(cache, layer, b, h)
                assert len(kept) == want == int(report.keep_counts[layer, b, h])
                assert_topk(kept, window, pooled[b, h], info.key_valid[b], want - w)


# -- VL-Cache --------------------------------------------------------------------------------------
VLCACHE = cfg({"name": "postvision"}, {"name": "sparsity", "p": 0.01}, recent=0.1)


def postvision_reference(q, k, info: PromptInfo, p: float = 0.01):
    """(scores `[B, Hkv, m]`, γ `[B]`) over rows `[v, m)`, float64, relative threshold."""
    probs = dense_probs(q, k, info)
    rows = torch.arange(info.m)[None, :] >= info.postvision_start[:, None]  # [B, m]
    probs = probs * rows[:, None, :, None]
    scores = group_sum(probs.sum(2), k.shape[1])
    causal = torch.ones(info.m, info.m, dtype=torch.bool).tril()
    vis = (causal & info.key_valid[:, None, :] & rows[:, :, None])[:, None]
    below = (probs < p * probs.amax(-1, keepdim=True)) & vis
    gamma = below.sum((2, 3)).double() / vis.sum((2, 3)).double()
    return scores, gamma.mean(1)


def vl_info():
    # image tokens [3, 40) then a question; different question lengths per sequence
    return make_info([57, 49], images=[(3, 40), (3, 40)])


def test_vlcache_scores_and_sparsity_match_float64():
    gen = torch.Generator().manual_seed(3)
    info = vl_info()
    data = random_layers(gen, 3, 2, 4, 2, info.m)
    policy, cache, report = run(VLCACHE, 0.3, info, data)
    for layer, (q, k, _) in enumerate(data):
        want_s, want_g = postvision_reference(q, k, info)
        got = policy.scorer.score(layer, policy.stats[layer], info).double()
        torch.testing.assert_close(got, want_s, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(report.sparsity[layer], want_g, rtol=0, atol=1e-9)
    # allocation = Algorithm 1 on the measured sparsity; recent window = round(0.1 k) most recent tokens
    beta = Sparsity().fractions(0.3, report.sparsity)
    k_want = torch.round(beta * info.lengths.double()).long()
    assert torch.equal(report.keep_counts[..., 0], k_want)
    for layer in range(3):
        for b in range(2):
            recent = set(range(info.m - round(0.1 * int(k_want[layer, b])), info.m))
            for h in range(2):
                kept = kept_positions(cache, layer, b, h)
                want_s, _ = postvision_reference(*data[layer][:2], info)
                n_scored = int(k_want[layer, b]) - len(recent)
                assert_topk(kept, recent, want_s[b, h], info.key_valid[b], n_scored)


def test_vlcache_uses_only_postvision_rows():
    gen = torch.Generator().manual_seed(4)
    info = vl_info()
    data = random_layers(gen, 2, 2, 4, 2, info.m)
    base, _, rep = run(VLCACHE, 0.3, info, data)
    rows = torch.arange(info.m)[None, :] < info.postvision_start[:, None]  # [B, m] rows before v
    pre = [(q + 5 * torch.randn(q.shape, generator=gen) * rows[:, None, :, None], k, v) for q, k, v in data]
    other, _, rep_pre = run(VLCACHE, 0.3, info, pre)
    torch.testing.assert_close(rep_pre.sparsity, rep.sparsity)
    score = lambda policy: policy.scorer.score(0, policy.stats[0], info)  # noqa: E731
    torch.testing.assert_close(score(other), score(base))
    post = [(q + 5 * torch.randn(q.shape, generator=gen) * ~rows[:, None, :, None], k, v) for q, k, v in data]
    moved, _, rep_post = run(VLCACHE, 0.3, info, post)
    assert not torch.allclose(score(moved), score(base))


def test_vlcache_relative_threshold_is_not_absolute():
    """Flat attention over > 100 keys: every probability is < 0.01 (absolute: all sparse), none is below 1% of
    the row max (relative: none sparse)."""
    info = make_info([161, 150], images=[(2, 140), (2, 130)])
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_layers(gen, 1, 2, 4, 2, info.m)[0]
    q = torch.zeros_like(q)  # every visible key gets the same probability
    _, _, report = run(VLCACHE, 0.3, info, [(q, k, v)])
    assert float(report.sparsity.max()) == 0.0
    probs = dense_probs(q, k, info)
    rows = torch.arange(info.m)[None, :] >= info.postvision_start[:, None]
    vis = probs > 0
    absolute = ((probs < 0.01) & vis & rows[:, None, :, None]).sum() / (vis & rows[:, None, :, None]).sum()
    assert float(absolute) > 0.99


def test_vlcache_dense_layer_gets_more_budget():
    gen = torch.Generator().manual_seed(6)
    info = vl_info()
    (q0, k0, v0), (q1, k1, v1) = random_layers(gen, 2, 2, 4, 2, info.m)
    dense = (torch.zeros_like(q0), k0, v0)  # flat rows: nothing below 1% of the max
    sparse = (q1 * 20.0, k1, v1)  # sharp rows: almost everything below
    _, _, report = run(VLCACHE, 0.2, info, [dense, sparse])
    assert float(report.sparsity[0].max()) < float(report.sparsity[1].min())
    assert bool((report.keep_counts[0] > report.keep_counts[1]).all())


def test_sparsity_allocator_sums_to_budget_when_nothing_clips():
    gen = torch.Generator().manual_seed(7)
    gamma = 0.3 + 0.4 * torch.rand(6, 3, generator=gen, dtype=torch.float64)
    beta = Sparsity().fractions(0.2, gamma)
    torch.testing.assert_close(beta.sum(0), torch.full((3,), 0.2 * 6, dtype=torch.float64))
    assert bool((beta[gamma.argmin(0), torch.arange(3)] == beta.amax(0)).all())  # densest layer gets most
    clipped = Sparsity().fractions(0.9, torch.tensor([[0.0], [0.9], [0.95]], dtype=torch.float64))
    assert float(clipped[0]) == 1.0 and float(clipped.sum()) < 0.9 * 3  # no renormalisation after clipping


# -- Elastic Cache: anchors and positional merging -------------------------------------------------
def nearest_anchor(j: int, anchors: list[int]) -> int:
    """Brute force: the nearest anchor, ties to the left."""
    return min(anchors, key=lambda a: (abs(a - j), a))


def test_merge_position_buckets_and_means():
    gen = torch.Generator().manual_seed(8)
    info = make_info([23, 18])
    layer = CompressedLayer()
    k, v = torch.randn(2, 2, info.m, D, generator=gen), torch.randn(2, 2, info.m, D, generator=gen)
    layer.update(k, v)
    pad = info.pad.tolist()
    anchors = {(0, 0): [0, 3, 8, 9, 22], (0, 1): [0, 6, 12, 22],
               (1, 0): [pad[1], pad[1] + 4, 22], (1, 1): [pad[1] + 2, pad[1] + 11]}
    kmax = max(map(len, anchors.values()))
    index = torch.zeros(2, 2, kmax, dtype=torch.long)
    count = torch.zeros(2, 2, dtype=torch.long)
    for (b, h), a in anchors.items():
        index[b, h, : len(a)] = torch.tensor(a)
        count[b, h] = len(a)
    keys, values = MergePosition().reduce(layer, index, count, info)
    # a gap split at the midpoint, floor to the left: 3 | 4 5 joins 3 and 6 7 joins 8 (midpoint 5)
    assert nearest_anchor(5, [3, 8]) == 3 and nearest_anchor(6, [3, 8]) == 8
    for (b, h), a in anchors.items():
        for slot, anchor in enumerate(a):
            bucket = [j for j in range(pad[b], info.m) if nearest_anchor(j, a) == anchor]
            assert anchor in bucket
            torch.testing.assert_close(keys[b, h, slot], k[b, h, bucket].mean(0))
            torch.testing.assert_close(values[b, h, slot], v[b, h, bucket].mean(0))


def test_elastic_anchors_shared_by_heads_and_merged():
    gen = torch.Generator().manual_seed(9)
    info = make_info([41, 34])
    data = random_layers(gen, 2, 2, 4, 2, info.m)
    elastic = cfg({"name": "accumulated"}, reducer={"name": "merge_position"},
                  decode={"name": "fixed_point"}, granularity="layer", sinks=1, recent=1)
    _, cache, report = run(elastic, 0.25, info, data)
    for layer, (q, k, v) in enumerate(data):
        score = group_sum(dense_probs(q, k, info).sum(2), 2).mean(1)  # [B, m]: head-averaged column sums
        for b in range(2):
            n, pad = int(info.lengths[b]), int(info.pad[b])
            kept = kept_positions(cache, layer, b, 0)
            assert kept == kept_positions(cache, layer, b, 1)
            assert len(kept) == round(0.25 * n) == int(report.keep_counts[layer, b, 0])
            assert_topk(kept, {pad, info.m - 1}, score[b], info.key_valid[b], len(kept) - 2)
            anchors = sorted(kept)
            for h in range(2):
                for slot, anchor in enumerate(anchors):
                    bucket = [j for j in range(pad, info.m) if nearest_anchor(j, anchors) == anchor]
                    merged = cache.layers[layer]
                    torch.testing.assert_close(merged.keys[b, h, slot], k[b, h, bucket].mean(0))
                    torch.testing.assert_close(merged.values[b, h, slot], v[b, h, bucket].mean(0))


# -- LOOK-M: text prior and similarity merging -----------------------------------------------------
LOOKM = cfg({"name": "text_prior"}, reducer={"name": "merge_similarity", "mode": "pivotal"}, recent=0.5)


def test_lookm_keeps_every_text_key():
    gen = torch.Generator().manual_seed(10)
    info = make_info([71, 60], images=[(5, 60), (4, 50)])
    data = random_layers(gen, 2, 2, 4, 2, info.m)
    _, cache, report = run(LOOKM, 0.2, info, data)
    text = info.key_valid & ~info.image_mask
    for layer, (q, k, _) in enumerate(data):
        score = group_sum(dense_probs(q, k, info).sum(2), 2)
        for b in range(2):
            n = int(info.lengths[b])
            budget_k = round(0.2 * n)
            recent = set(range(info.m - round(0.5 * budget_k), info.m))
            forced = set(torch.nonzero(text[b]).flatten().tolist()) | recent
            for h in range(2):
                kept = kept_positions(cache, layer, b, h)
                # the heavy hitters are image keys ranked by accumulated attention
                assert_topk(kept, forced, score[b, h], info.key_valid[b], budget_k - len(recent))
                assert int(report.keep_counts[layer, b, h]) == len(forced) + budget_k - len(recent)
    assert report.realised_budget > 0.2


@pytest.mark.parametrize("mode", ["pivotal", "averaged", "weighted"])
def test_merge_similarity_formula(mode):
    gen = torch.Generator().manual_seed(11)
    info = make_info([19, 15])
    k, v = torch.randn(2, 2, info.m, D, generator=gen), torch.randn(2, 2, info.m, D, generator=gen)
    layer = CompressedLayer()
    layer.update(k, v)
    pad = info.pad.tolist()
    kept = {(0, 0): [0, 4, 9, 18], (0, 1): [2, 3, 17], (1, 0): [pad[1], pad[1] + 7], (1, 1): [18]}
    index = torch.zeros(2, 2, 4, dtype=torch.long)
    count = torch.zeros(2, 2, dtype=torch.long)
    for (b, h), a in kept.items():
        index[b, h, : len(a)] = torch.tensor(a)
        count[b, h] = len(a)
    keys, values = MergeSimilarity(mode).reduce(layer, index, count, info)
    for (b, h), a in kept.items():
        joined = {c: [] for c in a}
        for e in range(pad[b], info.m):
            if e not in a:
                cos = [float(F.cosine_similarity(k[b, h, e], k[b, h, c], dim=0)) for c in a]
                best = max(range(len(a)), key=lambda i: cos[i])
                joined[a[best]].append((e, max(cos[best], 0.0)))
        for slot, c in enumerate(a):
            for t, out in ((k, keys), (v, values)):
                es = joined[c]
                if mode == "pivotal":
                    want = (t[b, h, c] + 0.5 * sum((t[b, h, e] + t[b, h, c] for e, _ in es), torch.zeros(D)))
                    want = want / (len(es) + 1)
                elif mode == "averaged":
                    want = (t[b, h, c] + sum((t[b, h, e] for e, _ in es), torch.zeros(D))) / (len(es) + 1)
                else:
                    want = (t[b, h, c] + sum((w * t[b, h, e] for e, w in es), torch.zeros(D)))
                    want = want / (1 + sum(w for _, w in es))
                torch.testing.assert_close(out[b, h, slot], want)
