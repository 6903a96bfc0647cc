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
    def from_ids(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_token_id: int,
        closing_token_id: int | None = None,
    ) -> PromptInfo:
        """Image tokens are the `image_token_id` positions. `closing_token_id`: a marker that ends an image span
        (Qwen2-VL's `<|vision_end|>`): a text token, but the post-vision start moves past it."""
        key_valid = attention_mask.bool()
        image_mask = (input_ids == image_token_id) & key_valid
        m = input_ids.shape[1]
        idx = torch.arange(m, device=input_ids.device)
        last_image = torch.where(image_mask, idx, -1).amax(1)
        first_real = torch.where(key_valid, idx, m).amin(1)
        start = torch.where(last_image >= 0, last_image + 1, first_real)
        if closing_token_id is not None:
            after = input_ids.gather(1, start.clamp(max=m - 1)[:, None])[:, 0]
            closes = (last_image >= 0) & (start < m) & (after == closing_token_id)
            start = start + closes.long()
        return cls(key_valid=key_valid, image_mask=image_mask, postvision_start=start)

    def to(self, device: torch.device | str) -> PromptInfo:
        """The same prompt information on `device` (a model split over devices: each layer's own)."""
        if self.key_valid.device == torch.device(device):
            return self
        return PromptInfo(
            key_valid=self.key_valid.to(device),
            image_mask=self.image_mask.to(device),
            postvision_start=self.postvision_start.to(device),
        )

    def image_spans(self) -> list[list[tuple[int, int]]]:
        """Per sequence, the `[start, end)` runs of consecutive image tokens (padded indices)."""
        spans = []
        for row in self.image_mask.cpu():
            edges = torch.diff(torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).int()).nonzero().flatten()
            spans.append([(int(a), int(b)) for a, b in edges.view(-1, 2).tolist()])
        return spans

    def position_ids(self) -> torch.Tensor:
        """`[B, m]` RoPE positions: real tokens count from 0 after the left padding (as transformers' generate)."""
        pos = self.key_valid.long().cumsum(1) - 1
        return pos.clamp(min=0)
