"""A slow, obviously-right reference for compressed decoding: keep the whole cache and mask what was evicted.

The language model runs with transformers' own DynamicCache and SDPA; an attention function registered for the
test hides, per layer and KV head, every prompt key the compressed run did not keep. If compression, the
cache's gather and the positions after eviction are right, both runs produce the same greedy tokens.

Positions come from the adapter (`adapter.positions`: 1-D for LLaVA-style models, Qwen2-VL's `[3, B, m]` M-RoPE
with `length + rope_delta` as the first decode position; `adapter.decode_position_ids` for each step), so the
reference runs every architecture the way its model expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

_MASKS: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, m] bool: prompt keys visible while decoding
_PREFILL: dict[str, torch.Tensor] = {}


def _masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, hq, n, _ = query.shape
    group = hq // key.shape[1]
    if n > 1:
        mask = _PREFILL["mask"]
    else:
        prompt = _MASKS[module.layer_idx]
        gen = torch.ones(b, prompt.shape[1], key.shape[2] - prompt.shape[2], dtype=torch.bool, device=prompt.device)
        mask = torch.cat([prompt, gen], -1).repeat_interleave(group, 1)[:, :, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("vlcache_test_masked", _masked_attention)


@torch.inference_mode()
def masked_reference_generate(adapter, inputs, kept_positions, steps: int) -> list[list[int]]:
    """Greedy tokens of the uncompressed model with the evicted prompt keys masked out.

    `kept_positions`: per layer `[B, Hkv, K]` kept prompt positions (unpadded indices, -1 for unused slots),
    as `GenerationOutput.kept_positions` reports them.
    """
    from vlcache.engine.attention import prefill_mask

    info = adapter.prompt_info(inputs)
    b, m = info.key_valid.shape
    for layer, kept in enumerate(kept_positions):
        padded = torch.where(kept >= 0, kept + info.pad[:, None, None], m)
        mask = torch.zeros(b, kept.shape[1], m + 1, dtype=torch.bool)
        mask.scatter_(2, padded, True)
        _MASKS[layer] = mask[..., :m] & info.key_valid[:, None]
    _PREFILL["mask"] = prefill_mask(info.key_valid)
    cfg = adapter.text_config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "vlcache_test_masked"
    try:
        cache = DynamicCache(config=cfg)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        position_ids, pos = adapter.positions(inputs, info)
        out = adapter.model(input_ids=inputs["input_ids"], position_ids=position_ids,
                            past_key_values=cache, use_cache=True, **extra)
        token = out.logits[:, -1].argmax(-1)
        tokens, pos = [token], pos.clone()
        for _ in range(steps - 1):
            out = adapter.model(input_ids=token[:, None], position_ids=adapter.decode_position_ids(pos),
                                past_key_values=cache, use_cache=True)
            pos += 1
            token = out.logits[:, -1].argmax(-1)
            tokens.append(token)
    finally:
        cfg._attn_implementation = saved
    return torch.stack(tokens, 1).tolist()
