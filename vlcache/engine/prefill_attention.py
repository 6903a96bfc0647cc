"""The prefill's attention over the dense prompt: SDPA, or FlashAttention-4's forward where it is installed.

At long prompts end-to-end time is mostly prefill, and prefill mostly causal attention: at (1, 128K) on an H200,
SDPA's choice (cuDNN's kernel) takes 254 ms a layer where FlashAttention-4's Hopper forward (the `flash-attn-4`
package, CuTe-DSL kernels compiled on first use) takes 215 (experiments/prefill_backends.py,
results/bench/prefill_backends_fa4_h200.json). It is an optional dependency (`pip install "vlcache[fa4]"`):

* ``auto`` (the default): FlashAttention-4 where it is installed and can run the call (`fa4_unusable` says when
  not: a padding mask, a CPU or pre-Hopper device, a dtype or head size it lacks), else SDPA;
* ``sdpa``: always SDPA (transformers' own choice, e.g. to compare against its numerics);
* ``fa4``: FlashAttention-4, and an error naming the reason where it cannot run.

Both compute softmax(q kᵀ · scale + causal mask) v with float32 accumulation; their bf16 outputs differ by rounding
(0.0039 at most at (1, 128K), as cuDNN's and FlashAttention-2's do).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "fa4")
FA4_INSTALL = 'pip install "vlcache[fa4]" (flash-attn-4; on CUDA 13 also "nvidia-cutlass-dsl[cu13]")'


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown prefill_attention {backend!r}; valid: {', '.join(BACKENDS)}")


@lru_cache(maxsize=1)
def load_fa4() -> tuple[Callable | None, str | None]:
    """FlashAttention-4's `flash_attn_func`, or None and why not (not installed, or failing to import)."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None, f"flash-attn-4 is not installed ({FA4_INSTALL})"
    except Exception as e:  # noqa: BLE001  (a broken install, e.g. no CUDA flavour of its compiler: SDPA under auto)
        return None, f"flash-attn-4 failed to import: {type(e).__name__}: {e}"
    return flash_attn_func, None


def fa4_unusable(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why FlashAttention-4 cannot run this prefill call (`[B, H, L, D]` queries and keys), or None."""
    fa4, why = load_fa4()
    if fa4 is None:
        return why
    if mask is not None:
        return "a padding mask (FlashAttention-4 takes causal attention without one)"
    if query.device.type != "cuda":
        return f"device {query.device} (FlashAttention-4 runs on CUDA)"
    major = torch.cuda.get_device_capability(query.device)[0]
    if major not in (9, 10):
        return f"compute capability {major}.x (FlashAttention-4's forward: Hopper 9.x or Blackwell 10.x)"
    if query.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {query.dtype} (FlashAttention-4: bfloat16 or float16)"
    d = query.shape[-1]
    if not 8 <= d <= 128 or d % 8:
        return f"head dim {d} (FlashAttention-4 here: a multiple of 8 from 8 to 128)"
    if query.shape[2] != key.shape[2]:
        # SDPA's is_causal aligns the mask top-left, FlashAttention's bottom-right: equal only for equal lengths
        return f"{query.shape[2]} queries over {key.shape[2]} keys (causal alignment differs)"
    return None


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of `[B, Hq, L, D]` queries over `[B, Hkv, L, D]` keys and values (grouped: query head h
    reads KV head h // (Hq // Hkv)); `mask` `[B, 1, L, L]` bool (padding) or None (causal). Returns `[B, L, Hq, D]`
    contiguous, the layout the attention module's output projection reads."""
    check_backend(backend)
    if backend != "sdpa":
        reason = fa4_unusable(query, key, mask)
        if reason is None:
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, L, H, D] views
            out = load_fa4()[0](q, k, v, softmax_scale=scale, causal=True)
            return (out[0] if isinstance(out, tuple) else out).contiguous()
        if backend == "fa4":
            raise RuntimeError(f"prefill_attention=fa4 cannot run this call: {reason}; use auto or sdpa")
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous()
