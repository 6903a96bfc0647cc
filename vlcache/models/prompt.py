"""What a policy needs to know about a batch of prompts: padding, image tokens, where the question starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptInfo:
    """A left-padded batch of prompts of padded length `m`.

    Indices are into the padded prompt (the cache's physical index before compression). `postvision_start[b]`
    is the first index after the last image token of sequence b (VL-Cache's `v`), or the first real token
    when the prompt has no image.
    """

    key_valid: torch.Tensor  # [B, m] bool: real (non-padding) tokens
    image_mask: torch.Tensor  # [B, m] bool: image tokens
    postvision_start: torch.Tensor  # [B] long

    @property
    def batch(self) -> int:
        return self.key_valid.shape[0]

    @property
    def m(self) -> int:
        return self.key_valid.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """`[B]` real prompt tokens per sequence (the `m` of policies.md, padding excluded)."""
        return self.key_valid.sum(1)

    @property
    def pad(self) -> torch.Tensor:
        """`[B]` left-padding tokens per sequence."""
        return self.m - self.lengths

    @property
    def has_image(self) -> torch.Tensor:
        return self.image_mask.any(1)

    @classmethod
    def from_ids(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> PromptInfo:
        key_valid = attention_mask.bool()
        image_mask = (input_ids == image_token_id) & key_valid
        m = input_ids.shape[1]
        idx = torch.arange(m, device=input_ids.device)
        last_image = torch.where(image_mask, idx, -1).amax(1)
        first_real = torch.where(key_valid, idx, m).amin(1)
        start = torch.where(last_image >= 0, last_image + 1, first_real)
        return cls(key_valid=key_valid, image_mask=image_mask, postvision_start=start)

    def position_ids(self) -> torch.Tensor:
        """`[B, m]` RoPE positions: real tokens count from 0 after the left padding (as transformers' generate)."""
        pos = self.key_valid.long().cumsum(1) - 1
        return pos.clamp(min=0)
