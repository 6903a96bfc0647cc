"""Re-rotating cached keys to new RoPE positions (StreamingLLM's rolling cache, Xiao et al., ICLR 2024, §3.2).

A key stored post-RoPE at position `p` is `R(p) k`; moving it to `p + δ` is `R(δ) R(p) k`, so undoing RoPE at
the stored position and re-applying it at the new one is a single rotation by `δ`. The rotation comes from the
model's own rotary module (its frequencies, its scaling type); its `attention_scaling` multiplies cos and sin
of both `R(p)` and `R(p + δ)` and cancels, so it is divided out here.
"""

from __future__ import annotations

import torch


def find_rotary(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's rotary embedding (`model.model.language_model.rotary_emb` for llava-hf models)."""
    for path in ("model.language_model.rotary_emb", "language_model.model.rotary_emb", "model.rotary_emb"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"no rotary embedding found in {type(model).__name__}: decode=rolling needs 1-D RoPE")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The Llama/GPT-NeoX pairing of dimensions (`transformers.models.llama.modeling_llama.rotate_half`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def shift_rope(x: torch.Tensor, delta: torch.Tensor, rotary: torch.nn.Module) -> torch.Tensor:
    """`x` (`[..., n, D]`, post-RoPE) moved by `delta` (`[..., n]`) positions; float32 in, float32 out."""
    n, d = x.shape[-2:]
    flat = x.reshape(-1, n, d)
    cos, sin = rotary(flat, delta.reshape(-1, n))  # rotary modules take `[batch, n]` position ids
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    cos, sin = cos.float() / scale, sin.float() / scale
    return (flat * cos + rotate_half(flat) * sin).reshape(x.shape)
