"""Tiny random-weight Llama-family causal LMs and ragged compressed caches for the fused decode step's tests."""

from __future__ import annotations

import copy

import torch

from vlcache.cache import CompressedCache
from vlcache.engine.attention import ForwardContext, forward_context, use_vlcache_attention

KINDS = ("llama", "mistral", "qwen2")


def tiny_lm(kind: str, seed: int = 0, dtype=torch.float32):
    """GQA 6:2, three layers; Llama with every bias (attention and MLP), Mistral with an explicit head_dim of 10
    (not hidden / heads), Qwen2 with its q/k/v biases. Weights and biases are drawn at a scale that makes the
    logits far from uniform."""
    import transformers as tf

    common = dict(
        vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    if kind == "llama":
        cfg = tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True)
        cls = tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg = tf.MistralConfig(**common, head_dim=10, sliding_window=None, rope_theta=1e4)
        cls = tf.MistralForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1e6)
        cls = tf.Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    use_vlcache_attention(model.config)
    return model.to(dtype)


def ragged_cache(model, batch: int, prompt: int, room: int, seed: int = 0, dtype=torch.float32) -> CompressedCache:
    """A compressed cache with random entries: per (layer, sequence, KV head) lengths between 1 and `prompt`
    (one row full), reserved to `prompt + room` entries."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    cache = CompressedCache(cfg.num_hidden_layers)
    for layer in cache.layers:
        k = torch.randn(batch, cfg.num_key_value_heads, prompt, d, generator=g).to(dtype)
        v = torch.randn(batch, cfg.num_key_value_heads, prompt, d, generator=g).to(dtype)
        layer.update(k, v)
        layer.length = torch.randint(1, prompt + 1, (batch, cfg.num_key_value_heads), generator=g)
        layer.length[0, 0] = prompt
        layer.positions = torch.where(torch.arange(prompt) < layer.length[..., None], layer.positions, -1)
        layer.compressed = True
        layer.reserve(prompt + room)
    return cache


def module_step(model, cache: CompressedCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One decode step through the model's own modules and the framework's attention (the reference)."""
    with forward_context(ForwardContext(cache=cache, fast_decode=True)):
        out = model(input_ids=tokens[:, None], position_ids=positions[:, None], past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def clone_cache(cache: CompressedCache) -> CompressedCache:
    return copy.deepcopy(cache)
