"""Kernels of vlcache: the attention scoring core (policies.md §4).

Imports only torch and triton so that GPU benchmark machines without the experiment stack
(hydra, wandb, lmms-eval) can use it.
"""

from .scores import attention_scores
from .scores_ref import AttentionScores, attention_scores_reference, attention_scores_torch

__all__ = ["AttentionScores", "attention_scores", "attention_scores_reference", "attention_scores_torch"]
from .decode_attention import decode_attention  # noqa: E402, F401  (ragged decode attention, fast_decode.py)
