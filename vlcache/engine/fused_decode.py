"""The fused decode step: one token per sequence through a Llama-family language model in few kernels.

transformers' decoder layer costs about fifty launches per token (vlcache/kernels/fused_ops.py says where they
go); at batch 1 a 7B model's step then takes about twice its bandwidth floor even when captured in a CUDA
graph. This step computes the same function as the model's forward with the compressed cache, per layer:

    q, a = rope_append_attention(x @ W_qkv, cache)  # one GEMM for q, k and v; RoPE, the append and the ragged
                                                    # attention in one launch (two with key-axis splits)
    h, x = residual_norm_linear(a, W_o, h, w_post)  # h += a @ W_o, x = RMSNorm(h): the norm in the epilogue
    h, x = residual_norm_linear(swiglu(x @ W_gate_up), W_down, h, w_in')  # SwiGLU in gate/up's epilogue

so five or six launches per layer instead of fifty, up to 64 sequences with 16-bit weights (beyond, the norms and
SwiGLU are launches of their own, `rms_norm` and `silu_mul`, and the projections cuBLAS's: seven or eight). Up to 64
sequences the four projections are Triton kernels (`vlcache.kernels.linear`): the output and down projections
without cuBLAS's split-K reduction launch, q/k/v a little faster than cuBLAS, and gate/up with SwiGLU applied in its
epilogue (`swiglu_linear`) (results/bench/linear_sweep_h200.json and linear_sweep_swiglu_qkv_h200.json; the last two
took 0.08-0.13 ms off a step at batch 1 and 4, experiments/step_forms_ab.py); 17-64 sequences take a 64-row tile
with K split between programs where that fills the GPU (0.25 ms off a step at batch 64, linear.py says). A norm
needs a whole row and a projection's program owns a few columns, so each norm is split between two launches: the
producer's epilogue writes ``h``, ``h · w_norm`` and its columns' sums of ``h²``, the consumer scales its sums by
each row's ``1 / rms`` in its own epilogue. (Folding the norm into the consumer's loads instead, ``h`` and the
residual read and added per tile, was slower, 4.17 → 5.28 ms a step at batch 1, 2K prompt, budget 0.1: the input
tiles then go through registers, and the loop no longer keeps them in flight.) The q/k/v and gate/up weights are
concatenated once (`fuse_projections`); the model's own `Linear` weights become views of the fused tensors, so no
memory is added and the model's forward still works. Cosine and sine come from the model's own rotary module (every
RoPE scaling type it implements). Rounding follows transformers' operations, so tokens match the module path
(tests/test_fused_decode.py), but for the split norm, which rounds ``h · w_norm`` where transformers rounds
``h / rms`` then ``w_norm ·`` that (equal to the 16-bit type's rounding; float32 weights on CUDA keep the separate
launches). Decode rules that watch every token get `on_decode(layer, query)` as there.

Supported: text models whose `model_type` is llama, mistral or qwen2 (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision
language models, the embedded model) with SiLU MLPs, on one device. `unsupported_reason` says why not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlcache.cache import CompressedCache
from vlcache.kernels.decode_attention import rope_append_attention
from vlcache.kernels.fused_ops import rms_norm
from vlcache.kernels.linear import (
    QKV_CONFIG,
    SWIGLU_CONFIG,
    Normed,
    decode_linear,
    normed_linear,
    residual_norm_linear,
)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class _Layer:
    w_in: torch.Tensor
    eps_in: float
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    w_post: torch.Tensor
    eps_post: float
    w_gu: torch.Tensor
    b_gu: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    scale: float


def _text_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the decoder stack, the LM head) of a causal LM or a VLM."""
    return model.get_decoder(), model.get_output_embeddings()


def unsupported_reason(model) -> str | None:
    """Why the fused step cannot run this model (None: it can)."""
    try:
        text, head = _text_parts(model)
    except (AttributeError, NotImplementedError) as err:
        return f"no decoder / output embeddings ({err})"
    cfg = text.config
    if cfg.model_type not in SUPPORTED_TYPES:
        return f"model_type {cfg.model_type!r} (fused step: {', '.join(SUPPORTED_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (fused step: silu)"
    if head is None or not hasattr(text, "rotary_emb"):
        return "no LM head or rotary module"
    devices = {p.device for p in text.parameters()} | {p.device for p in head.parameters()}
    if len(devices) != 1 or any(hasattr(m, "_hf_hook") for m in text.modules()):
        return "model split over devices (device_map)"
    return None


def _fuse_rows(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenates the weights (and biases) of `linears` along the output axis; each `Linear` then holds a
    view of the fused tensor, so the model keeps one copy and its own forward is unchanged."""

    def fuse(tensors: list[torch.nn.Parameter]) -> torch.Tensor:
        fused = torch.cat([t.detach() for t in tensors], 0)
        off = 0
        for t in tensors:
            rows = t.shape[0]
            t.data = fused[off : off + rows]
            off += rows
        return fused

    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors: the model may be trained later
        w = fuse([lin.weight for lin in linears])
        b = None if linears[0].bias is None else fuse([lin.bias for lin in linears])
    return w, b


def fuse_projections(model) -> list[_Layer]:
    """The per-layer weights of the fused step (q/k/v and gate/up concatenated once, cached on the model; fused
    again if the model's weights were replaced since, e.g. by `model.to(dtype)`)."""
    text, _ = _text_parts(model)
    cached = getattr(model, "_vlcache_fused_layers", None)
    if cached is not None and all(
        f.w_qkv.data_ptr() == layer.self_attn.q_proj.weight.data_ptr()
        and f.w_gu.data_ptr() == layer.mlp.gate_proj.weight.data_ptr()
        for f, layer in zip(cached, text.layers)
    ):
        return cached
    layers = []
    for layer in text.layers:
        att, mlp = layer.self_attn, layer.mlp
        w_qkv, b_qkv = _fuse_rows([att.q_proj, att.k_proj, att.v_proj])
        w_gu, b_gu = _fuse_rows([mlp.gate_proj, mlp.up_proj])
        layers.append(
            _Layer(
                w_in=layer.input_layernorm.weight, eps_in=layer.input_layernorm.variance_epsilon,
                w_qkv=w_qkv, b_qkv=b_qkv, w_o=att.o_proj.weight, b_o=att.o_proj.bias,
                w_post=layer.post_attention_layernorm.weight,
                eps_post=layer.post_attention_layernorm.variance_epsilon,
                w_gu=w_gu, b_gu=b_gu, w_down=mlp.down_proj.weight, b_down=mlp.down_proj.bias,
                scale=float(att.scaling),
            )
        )
    model._vlcache_fused_layers = layers
    return layers


class FusedDecoder:
    """`decoder(tokens [B], position_ids, cache, seen) -> logits [B, vocab]`: one decode step over a reserved
    `CompressedCache` (`CompressedLayer.reserve`), in place, with no host synchronisation (CUDA-graph safe).

    `seen` is a device scalar shared by every layer's `seen_device`: the tokens seen, the new one included (its
    logical index, what `CompressedLayer.positions` records, is `seen - 1`); the caller advances it before the
    step, as the module path's `CompressedLayer.update` does before attention. `on_decode(layer_idx, query
    [B, Hq, 1, D])` is called after each layer's attention, as the module path's attention function calls it;
    `decode_logits(layer_idx, num_heads)`, where given, returns buffers for the attention to write its logits into
    before it (`rope_append_attention(logits=...)`: H2O's running scores), or None.
    """

    def __init__(self, model) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fused decode step does not support this model: {reason}")
        self.text, self.head = _text_parts(model)
        cfg = self.text.config
        self.num_heads = cfg.num_attention_heads
        self.layers = fuse_projections(model)
        norm = self.text.norm
        self.w_norm, self.eps_norm = norm.weight, norm.variance_epsilon

    def __call__(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        cache: CompressedCache,
        seen: torch.Tensor,
        on_decode: Callable[[int, torch.Tensor], None] | None = None,
        decode_logits: Callable[[int, int], tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        h = self.text.embed_tokens(tokens)  # [B, H]
        cos, sin = self.text.rotary_emb(h, position_ids)  # [B, 1, D]
        cos, sin = cos[:, 0], sin[:, 0]
        b, last = tokens.shape[0], len(self.layers) - 1
        w0 = self.layers[0]
        x = Normed(rms_norm(h, w0.w_in, w0.eps_in)[1], None, w0.eps_in)
        for i, (w, layer) in enumerate(zip(self.layers, cache.layers)):
            q, a = rope_append_attention(
                normed_linear(x, w.w_qkv, w.b_qkv, config=QKV_CONFIG), cos, sin, layer.keys, layer.values,
                layer.length, layer.positions, seen, self.num_heads, w.scale, bounds=layer.bounds,
                max_cap=layer.capacity, logits=decode_logits and decode_logits(i, self.num_heads),
            )  # fmt: skip
            if on_decode is not None:
                on_decode(i, q)
            h, x = residual_norm_linear(a.view(b, -1), w.w_o, w.b_o, h, w.w_post, w.eps_post)
            act = normed_linear(x, w.w_gu, w.b_gu, swiglu=True, config=SWIGLU_CONFIG)
            if i < last:
                nxt = self.layers[i + 1]
                h, x = residual_norm_linear(act, w.w_down, w.b_down, h, nxt.w_in, nxt.eps_in)
        _, x = rms_norm(h, self.w_norm, self.eps_norm, residual=decode_linear(act, w.w_down, w.b_down))
        return self.head(x)
