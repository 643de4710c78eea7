"""One vector per hidden state: cls (first token), mean (over real tokens), last (last real token).

Masks are honoured whichever side the tokenizer pads on, so a padded batch pools exactly like each item
alone. Pooling runs in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch

POOLINGS = ("cls", "mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """hidden [B, T, D], mask [B, T] (1 = real token, or None: all real) -> [B, D] fp32."""
    hidden = hidden.float()
    if mask is None:
        if mode == "cls":
            return hidden[:, 0]
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = mask.to(hidden.device)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if mode == "cls":  # the first real token (position 0 unless the tokenizer pads on the left)
        return hidden[rows, mask.long().argmax(dim=1)]
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if mode == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)
        return hidden[rows, last]
    raise ValueError(f"pooling '{mode}' not one of {', '.join(POOLINGS)}")


def pool_layers(hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor | None, mode: str,
                layers: list[int]) -> torch.Tensor:
    """Pool the selected hidden states: -> [B, len(layers), D] fp32 (pooling is per layer, so pooling only
    the kept ones equals pooling all and slicing)."""
    return torch.stack([pool(hidden_states[i], mask, mode) for i in layers], dim=1)
