"""The framework's attention function, registered in transformers' `AttentionInterface` as "vlcache".

It is wired into the language model only (`use_vlcache_attention`), so the vision tower keeps its own. During
prefill it runs SDPA (or FlashAttention-4: prefill_attention.py) over the dense prompt and hands each layer's
post-RoPE queries and keys to the policy's observer (the only moment queries exist); during decoding it attends
over the compressed cache's valid entries. Masks come from the engine's `ForwardContext`, not from transformers'
mask builders: no mask function is registered for "vlcache", so transformers passes `attention_mask=None` and
builds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from vlcache.cache import CompressedCache
from vlcache.engine.prefill_attention import prefill_attention

ATTN_NAME = "vlcache"

# (layer_idx, query [B, Hq, n, D], key [B, Hkv, m, D]) -> None
PrefillObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
# (layer_idx, query [B, Hq, 1, D]) -> None, called after the new token's entry was appended
DecodeObserver = Callable[[int, torch.Tensor], None]


@dataclass
class ForwardContext:
    cache: CompressedCache
    prefill_mask: torch.Tensor | None = None  # [B, 1, m, m] bool, causal and padding; None: causal, no padding
    prefill_backend: str = "auto"  # the prefill's attention kernel: auto | sdpa | fa4 (prefill_attention.py)
    on_prefill: PrefillObserver | None = None
    on_decode: DecodeObserver | None = None
    # the fused step only: (layer, query heads) -> buffers its attention writes the logits into, for on_decode
    decode_logits: Callable[[int, int], tuple[torch.Tensor, torch.Tensor] | None] | None = None
    # the fast path only: called once a decode step has run every layer (FixedPoint's deletions in one launch)
    on_step: Callable[[], None] | None = None
    fast_decode: bool = False  # decode with the ragged kernel over per-row lengths (fast_decode.py)


_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("vlcache_forward", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


def prefill_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """`[B, 1, m, m]`: row i sees valid keys j <= i. Padded rows see themselves so SDPA never gets an empty row."""
    m = key_valid.shape[1]
    causal = torch.ones(m, m, dtype=torch.bool, device=key_valid.device).tril()
    mask = causal & key_valid[:, None, :]
    mask |= torch.eye(m, dtype=torch.bool, device=key_valid.device)
    return mask[:, None]


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of `[B, Hq, n, D]` queries over a ragged cache (`valid`: `[B, Hkv, capacity]`)."""
    group = query.shape[1] // keys.shape[1]
    mask = valid.repeat_interleave(group, dim=1)[:, :, None, :]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


def vlcache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    ctx = _CONTEXT.get()
    if ctx is None:  # the model used outside the engine behaves like plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layer_idx = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache_layer = ctx.cache.layers[layer_idx]
    if not cache_layer.compressed:
        mask = ctx.prefill_mask
        if mask is not None and mask.device != query.device:  # a model split with device_map: this layer's GPU
            mask = mask.to(query.device)
        out = prefill_attention(query, key, value, mask, scale, ctx.prefill_backend)  # [B, m, Hq, D]
        if ctx.on_prefill is not None:
            ctx.on_prefill(layer_idx, query, key)
        return out, None
    if ctx.fast_decode:  # Triton on CUDA (no mask built, valid entries only), PyTorch fallback on the CPU
        from vlcache.kernels.decode_attention import decode_attention as ragged_decode_attention

        out = ragged_decode_attention(query, key, value, cache_layer.length, scale)
    else:
        out = decode_attention(query, key, value, cache_layer.valid_mask(), scale)
    if ctx.on_decode is not None:
        ctx.on_decode(layer_idx, query)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, vlcache_attention)


def use_vlcache_attention(text_config) -> None:
    """Routes the language model's attention through `vlcache_attention` (the vision tower is untouched)."""
    text_config._attn_implementation = ATTN_NAME
