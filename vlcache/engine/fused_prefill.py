"""The fused prefill: the language model's forward over the prompt with transformers' elementwise passes fused.

At 32K-128K prompt tokens about 15% of prefill's GPU time goes to transformers' unfused elementwise operations
(results/bench/profile_prefill_4x32768.txt): each RMSNorm is six float32 passes (cast, pow, mean, rsqrt, two
muls), RoPE about eight (slices, negation, ``cat``, products and sums for the queries and the keys), SwiGLU two
(SiLU, the gate·up product), plus two residual adds per layer. This loop computes the same function as the
decoder's forward (``LlamaModel.forward`` / ``MistralModel.forward`` / ``Qwen2Model.forward`` with their
``DecoderLayer``, ``Attention``, ``RMSNorm`` and ``MLP``), per layer, with the decode step's kernels
(vlcache/engine/fused_decode.py, vlcache/kernels/fused_ops.py) and one more (vlcache/kernels/prefill_ops.py):

    h, x = rms_norm(h, w_in, residual=delta)         # the previous MLP's output added in the same pass
    q, k, v = rope_split(x @ W_qkv, cos, sin)        # one GEMM for q, k and v; RoPE and the head split in one pass
    k, v = cache.update(k, v, layer)                 # as the attention module does
    a = vlcache_attention(self_attn, q, k, v)        # the framework's attention: SDPA + the policy's observer
    h, x = rms_norm(h, w_post, residual=a @ W_o)
    delta = silu_mul(x @ W_gate_up) @ W_down         # one GEMM for gate and up, one pass for SwiGLU

so four elementwise passes per layer instead of about two dozen, and three GEMM launches fewer. The weights are
the decode step's (`fuse_projections`: q/k/v and gate/up concatenated once, the model's own `Linear`s become views,
so no memory is added); cosine and sine come from the model's own rotary module. Rounding follows transformers'
operations, so the logits and the cache equal the module path's up to the order of float32 sums (the Triton
RMSNorm's mean; on the GPU also the GEMMs, whose kernels cuBLAS picks by shape) and a last-place difference of
`silu_mul`'s PyTorch form on the CPU (SiLU of a strided slice); with transformers' operations in each pass the loop
is the model's forward bit for bit on the CPU (tests/test_fused_prefill.py).

`fused_prefill(model)` swaps the decoder's `forward` for this one while the context is open, so the outer
CausalLM or VLM forward (image features, `inputs_embeds`, `logits_to_keep`, the LM head) runs unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from vlcache.engine.attention import ATTN_NAME, vlcache_attention
from vlcache.engine.fused_decode import _Layer, _text_parts, fuse_projections, unsupported_reason
from vlcache.kernels.fused_ops import rms_norm, silu_mul
from vlcache.kernels.launch import on_device
from vlcache.kernels.prefill_ops import rope_split

# what the outer forwards hand down to the decoder (LLaVA-OneVision passes `logits_to_keep`): theirs, not its
_IGNORED_KWARGS = ("logits_to_keep", "cache_position", "return_dict")


def prefill_unsupported_reason(model) -> str | None:
    """Why the fused prefill cannot run `model` (None: it can): `unsupported_reason`'s model types and layouts,
    the framework's attention wired in (the loop calls it whatever the config says), and no forward hooks on
    the decoder's modules (the loop calls none of them but the embedding and the rotary module)."""
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    text, _ = _text_parts(model)
    impl = text.config._attn_implementation
    if impl != ATTN_NAME:
        return f"attention implementation {impl!r} (fused prefill: {ATTN_NAME!r}, use_vlcache_attention)"
    hooked = [name or "<decoder>" for name, m in text.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked:
        return f"forward hooks on {', '.join(hooked[:3])} (the fused loop does not call those modules)"
    return None


def fused_forward(
    text: torch.nn.Module,
    layers: list[_Layer],
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    **kwargs,
) -> BaseModelOutputWithPast:
    """`MistralModel.forward` (and Llama's, Qwen2's) of the decoder `text` with the fused layer loop over its
    fused weights `layers` (`fuse_projections`). Takes `input_ids` or `inputs_embeds` `[B, L, H]`, 1-D RoPE
    `position_ids` `[B, L]` or `[1, L]` (default: counting on from the cache's length, as transformers does);
    `attention_mask` is ignored, as with the framework's attention (its masks come from the `ForwardContext`).
    Returns `BaseModelOutputWithPast(last_hidden_state [B, L, H], past_key_values)`, as the decoder does."""
    del attention_mask  # transformers passes None to "vlcache" attention too: no mask function is registered
    for key in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(key, None):
            raise NotImplementedError(f"the fused prefill does not return per-layer outputs ({key}=True)")
    unknown = sorted(k for k, v in kwargs.items() if k not in _IGNORED_KWARGS and v is not None)
    if unknown:
        raise TypeError(f"the fused prefill does not take {', '.join(unknown)}")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if torch.is_grad_enabled() and text.embed_tokens.weight.requires_grad:
        raise RuntimeError("the fused prefill's kernels have no backward: run it under torch.inference_mode()")
    cfg = text.config
    h3 = text.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    B, L, H = h3.shape
    T = B * L
    # merge_with_config_defaults' default, then MistralModel.forward's cache and positions
    use_cache = cfg.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=cfg)
    if position_ids is None:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = (torch.arange(L, device=h3.device) + past)[None]
    if position_ids.dim() != 2 or position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
        raise ValueError(
            f"the fused prefill takes 1-D RoPE positions [B, L] or [1, L]; got {tuple(position_ids.shape)} for "
            f"inputs [{B}, {L}]"
        )
    if any(t.dtype != h3.dtype for w in layers for t in (w.w_in, w.w_qkv, w.w_post, w.w_gu)):
        raise ValueError(f"the fused prefill wants the decoder's weights in the activations' dtype {h3.dtype}")
    cos, sin = text.rotary_emb(h3, position_ids)  # [B or 1, L, D], in the activations' dtype
    cos, sin = cos.expand(B, L, -1).reshape(T, -1), sin.expand(B, L, -1).reshape(T, -1)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads

    h = h3.reshape(T, H)
    delta = None  # the previous sub-layer's output, added to h by the next norm's pass
    with on_device(h):  # Triton launches on the current device: the model's own GPU
        for w, layer in zip(layers, text.layers[: cfg.num_hidden_layers]):
            att = layer.self_attn
            h, x = rms_norm(h, w.w_in, w.eps_in, residual=delta)
            q, k, v = rope_split(F.linear(x, w.w_qkv, w.b_qkv), cos, sin, B, hq, hkv)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, att.layer_idx)
            a, _ = vlcache_attention(att, q, k, v, None, scaling=w.scale)  # [B, L, Hq, D]
            h, x = rms_norm(h, w.w_post, w.eps_post, residual=F.linear(a.reshape(T, -1), w.w_o, w.b_o))
            delta = F.linear(silu_mul(F.linear(x, w.w_gu, w.b_gu)), w.w_down, w.b_down)
        _, x = rms_norm(h, text.norm.weight, text.norm.variance_epsilon, residual=delta)
    return BaseModelOutputWithPast(
        last_hidden_state=x.view(B, L, H), past_key_values=past_key_values if use_cache else None
    )


@contextmanager
def fused_prefill(model) -> Iterator[None]:
    """While open, `model`'s decoder (`model.get_decoder()`) runs `fused_forward` instead of its own forward, so
    `model(...)` (a causal LM or a VLM) computes its prompt through the fused loop; the decoder's forward is
    restored on exit, exceptions included. Raises ValueError for a model `prefill_unsupported_reason` rejects."""
    reason = prefill_unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"the fused prefill does not support this model: {reason}")
    with swapped_forward(model):
        yield


@contextmanager
def swapped_forward(model) -> Iterator[None]:
    """`fused_prefill` without its support check, for a caller that has just made it
    (`VLMAdapter.prefill`)."""
    text, _ = _text_parts(model)
    layers = fuse_projections(model)
    saved = text.__dict__.get("forward")  # an instance-level forward already there (a nested use): put it back
    text.forward = functools.partial(fused_forward, text, layers)
    try:
        yield
    finally:
        if saved is None:
            del text.forward
        else:
            text.forward = saved
