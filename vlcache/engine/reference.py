"""Elastic Cache's quality protocol: the full-cache answer is the reference, and a compressed cache is scored by
how well it predicts that answer (Liu et al., ECCV 2024, arXiv 2407.18121, §4.1: PPL and ROUGE-L of each
budget against the full cache's output).

`reference_nll` gives the perplexity half: the reference tokens are fed through the compressed cache by teacher
forcing, as `generate` feeds its own tokens, so decode rules that change the cache every step (Elastic's fixed
point, H2O) act on the same stream they would see when the reference is generated. The prompt is prefilled and
compressed again for this pass: a deterministic policy keeps the same entries as when it generated its own
answer, while `random` draws again.
"""

from __future__ import annotations

import math

import torch

from vlcache.engine.attention import forward_context
from vlcache.engine.generate import prefill_and_compress
from vlcache.policies.policy import Policy


@torch.inference_mode()
def reference_nll(adapter, policy: Policy, inputs: dict[str, torch.Tensor],
                  references: list[list[int]]) -> list[tuple[float, int]]:
    """Per sequence of a left-padded batch: (sum of −log p(reference token), number of tokens) under `policy`'s
    compressed cache, the reference fed by teacher forcing. A reference with no token gives (0.0, 0)."""
    if len(references) != int(inputs["input_ids"].shape[0]):
        raise ValueError(f"{len(references)} references for a batch of {int(inputs['input_ids'].shape[0])}")
    pre = prefill_and_compress(adapter, policy, inputs)
    cache, positions = pre.cache, pre.positions
    steps = max((len(r) for r in references), default=0)
    device = pre.logits.device
    ref = torch.full((len(references), max(steps, 1)), adapter.pad_token_id, dtype=torch.long, device=device)
    for row, tokens in enumerate(references):
        ref[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
    lengths = torch.tensor([len(r) for r in references], device=device)
    nll = torch.zeros(len(references), dtype=torch.float64, device=device)
    logits = pre.logits
    with forward_context(pre.ctx):
        for t in range(steps):
            logp = torch.log_softmax(logits.double(), -1).gather(1, ref[:, t : t + 1]).squeeze(1)
            nll -= torch.where(t < lengths, logp, torch.zeros_like(logp))
            if t + 1 < steps:
                logits = adapter.decode(ref[:, t], positions, cache)
                positions += 1
    return [(float(n), int(c)) for n, c in zip(nll.tolist(), lengths.tolist())]


def perplexity(nll: float, count: int) -> float | None:
    """exp(mean negative log-likelihood); None for an empty reference."""
    return math.exp(nll / count) if count else None
