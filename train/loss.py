"""In-batch debiased softmax cross-entropy (docs/method.md §3; Yi et al., RecSys 2019), vectorised.

Columns are every slot of the batch (c = 11 b + t), rows every input position (r = 10 b + j):
S = H Eᵀ - log p[id(c)]; padding columns and, for each row, the columns holding any item of the same user's
11 slots are set to -1e4 (a large finite value: logits may be half precision), then the positive column
c* = 11 b + j + 1 is restored; the mean cross-entropy is taken over rows whose mask is 1. The reference code
builds the same mask with per-sample Python loops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED = -1e4


def masked_logits(user_states: torch.Tensor, item_embeddings: torch.Tensor, ids: torch.Tensor,
                  log_popularity: torch.Tensor, row_ids: torch.Tensor | None = None, row_offset: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The debiased, masked logits [b L, B (L+1)] and each row's positive column [b L]. The columns are the
    batch's B users' slots (item_embeddings, ids); the rows are users row_offset .. row_offset + b of it, whose
    slot ids are row_ids (default: all B users, ids); distributed training scores a rank's rows so."""
    b, L, d = user_states.shape
    slots = L + 1
    row_ids = ids if row_ids is None else row_ids
    H = user_states.reshape(b * L, d)
    E = item_embeddings.reshape(-1, d)
    flat_ids = ids.reshape(-1)
    logits = H @ E.T - log_popularity[flat_ids].to(H.dtype)[None, :]
    positives = ((row_offset + torch.arange(b, device=ids.device))[:, None] * slots
                 + torch.arange(1, slots, device=ids.device)[None, :]).reshape(b * L)
    positive_logits = logits.gather(1, positives[:, None])
    # Column c is masked for user b if its id is padding or is any of user b's slot ids.
    same_user_item = (flat_ids[None, :, None] == row_ids[:, None, :]).any(dim=2)   # [b, B (L+1)]
    masked = same_user_item.repeat_interleave(L, dim=0) | (flat_ids == 0)[None, :]
    return logits.masked_fill(masked, MASKED).scatter(1, positives[:, None], positive_logits), positives


def inbatch_debiased_loss(user_states: torch.Tensor, item_embeddings: torch.Tensor, ids: torch.Tensor,
                          mask: torch.Tensor, log_popularity: torch.Tensor, row_ids: torch.Tensor | None = None,
                          row_offset: int = 0, count: torch.Tensor | None = None) -> torch.Tensor:
    """user_states [B, L, d] (position j predicts slot j + 1); item_embeddings [B, L + 1, d]; ids [B, L + 1]
    (0 = padding); mask [B, L] (1 where slot j + 1 is a real next item); log_popularity [N + 1] (log p, 0 at
    index 0). The mean cross-entropy over the valid rows; with `count` (distributed: the global number of valid
    rows), the rows' summed cross-entropy divided by it, the rows being `masked_logits`' row_ids / row_offset."""
    logits, positives = masked_logits(user_states, item_embeddings, ids, log_popularity, row_ids, row_offset)
    keep = mask.reshape(-1).bool()
    kept = logits[keep]
    if count is not None:
        if not int(count):
            return logits.sum() * 0.0
        return F.cross_entropy(kept.to(torch.promote_types(kept.dtype, torch.float32)), positives[keep],
                               reduction="sum") / count
    if not len(kept):  # no next item in the batch (possible when --cold-items empties short sequences)
        return logits.sum() * 0.0
    return F.cross_entropy(kept.to(torch.promote_types(kept.dtype, torch.float32)), positives[keep])
