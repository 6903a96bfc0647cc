"""Prefill → score → compress → decode, greedily, for one batch (design.md, "Data flow of one job")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlcache.cache import CompressedCache
from vlcache.engine.attention import ForwardContext, forward_context, prefill_mask
from vlcache.engine.timing import now_ms, peak_bytes, reset_peak
from vlcache.models.prompt import PromptInfo
from vlcache.policies.policy import CompressionReport, Policy


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per sequence, EOS and what follows removed
    report: CompressionReport
    kept_positions: list[torch.Tensor]  # per layer `[B, Hkv, K]`: kept prompt positions (unpadded), -1 unused
    prompt_tokens: list[int]
    image_tokens: list[int]
    prefill_ms: float  # forward over the prompt, scoring included
    compress_ms: float  # allocation, selection, merging, cache shrink
    decode_ms: float
    new_tokens: int  # decode steps run (the longest sequence's generated length)
    kv_bytes_full: int  # the prompt's entries, uncompressed, padding excluded
    kv_bytes_kept: int  # the prompt's entries kept after compression
    kv_bytes_allocated: int  # the cache's storage after compression
    peak_gpu_bytes: int | None

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode_ms / max(self.new_tokens - 1, 1)

    @property
    def e2e_ms(self) -> float:
        return self.prefill_ms + self.compress_ms + self.decode_ms


@dataclass
class Prefilled:
    """The state after prefill and compression, shared by the simple loop and the fast path (fast_decode)."""

    info: PromptInfo
    cache: CompressedCache
    ctx: ForwardContext  # ready for decoding: prefill mask and observer cleared, decode observer set
    logits: torch.Tensor  # [B, vocab] at the last prompt position
    positions: torch.Tensor  # [B] first decode position of each sequence
    report: CompressionReport
    kept_positions: list[torch.Tensor]
    kv_kept: int
    kv_alloc: int
    prefill_ms: float
    compress_ms: float
    t_decode: float  # host clock (ms) when decoding may start


def prefill_and_compress(adapter, policy: Policy, inputs: dict[str, torch.Tensor]) -> Prefilled:
    """Prefill (scoring observer attached), `policy.compress`, and the decode context."""
    device = adapter.device
    info = adapter.prompt_info(inputs)
    cache = CompressedCache(adapter.num_layers)
    # no padding: SDPA's own causal mode (flash kernels, no m x m mask; a dense mask with GQA falls back to the
    # math kernel, whose m x m scores do not fit at 32K)
    mask = None if bool(info.key_valid.all()) else prefill_mask(info.key_valid)
    ctx = ForwardContext(cache=cache, prefill_mask=mask, prefill_backend=adapter.prefill_attention)
    reset_peak(device)

    t0 = now_ms(device)
    policy.bind(adapter)
    ctx.on_prefill = policy.begin(info, adapter.num_layers)
    with forward_context(ctx):
        logits, positions = adapter.prefill(inputs, info, cache)
    t1 = now_ms(device)
    report = policy.compress(cache)
    # each layer on its own device when the model is split with device_map
    kept_positions = [(layer.positions - info.pad.to(layer.positions.device)[:, None, None]).clamp(min=-1)
                      for layer in cache.layers]
    kv_kept, kv_alloc = cache.kept_bytes(), cache.nbytes()
    t2 = now_ms(device)

    ctx.prefill_mask, ctx.on_prefill = None, None
    if policy.decode_rule.acts_per_token:
        ctx.on_decode = lambda layer_idx, query: policy.decode_rule.on_token(layer_idx, query, cache)
    return Prefilled(
        info=info, cache=cache, ctx=ctx, logits=logits, positions=positions, report=report,
        kept_positions=kept_positions, kv_kept=kv_kept, kv_alloc=kv_alloc,
        prefill_ms=t1 - t0, compress_ms=t2 - t1, t_decode=t2,
    )


def build_output(
    adapter, pre: Prefilled, generated: list[list[int]], new_tokens: int, decode_ms: float
) -> GenerationOutput:
    """The `GenerationOutput` of `generated` (ids per sequence, one per decode step, EOS included)."""
    eos = adapter.eos_token_id
    tokens = [seq[: seq.index(eos)] if eos in seq else seq for seq in generated]
    info, cache = pre.info, pre.cache
    entry_bytes = 2 * adapter.num_kv_heads * adapter.head_dim * cache.layers[0].keys.element_size()
    return GenerationOutput(
        tokens=tokens,
        report=pre.report,
        kept_positions=[p.cpu() for p in pre.kept_positions],
        prompt_tokens=info.lengths.tolist(),
        image_tokens=info.image_mask.sum(1).tolist(),
        prefill_ms=pre.prefill_ms,
        compress_ms=pre.compress_ms,
        decode_ms=decode_ms,
        new_tokens=new_tokens,
        kv_bytes_full=int(info.lengths.sum()) * adapter.num_layers * entry_bytes,
        kv_bytes_kept=pre.kv_kept,
        kv_bytes_allocated=pre.kv_alloc,
        peak_gpu_bytes=peak_bytes(adapter.device),
    )


@torch.inference_mode()
def generate(adapter, policy: Policy, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> GenerationOutput:
    """Greedy decoding of a left-padded batch with `policy` compressing the prompt's cache."""
    device = adapter.device
    pre = prefill_and_compress(adapter, policy, inputs)
    cache, ctx, positions = pre.cache, pre.ctx, pre.positions
    token = pre.logits.argmax(-1)
    finished = token == adapter.eos_token_id
    steps = [token]
    with forward_context(ctx):
        while len(steps) < max_new_tokens and not bool(finished.all()):
            logits = adapter.decode(token, positions, cache)
            positions += 1
            token = torch.where(finished, adapter.pad_token_id, logits.argmax(-1))
            finished |= token == adapter.eos_token_id
            steps.append(token)
    t3 = now_ms(device)
    generated = torch.stack(steps, 1).tolist()
    return build_output(adapter, pre, generated, len(steps), t3 - pre.t_decode)
