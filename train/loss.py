"""The training objectives (docs/method.md §3), vectorised: the in-batch debiased softmax cross-entropy (Yi et
al., RecSys 2019), the same with catalogue negatives sampled per batch (mixed negative sampling, Yang et al.,
WWW 2020, with each column's log-Q correction), and the full softmax over the catalogue's training items.

In-batch:

Columns are every slot of the batch (c = 11 b + t), rows every input position (r = 10 b + j):
S = H Eᵀ - log p[id(c)]; padding columns and, for each row, the columns holding any item of the same user's
11 slots are set to -1e4 (a large finite value: logits may be half precision), then the positive column
c* = 11 b + j + 1 is restored; the mean cross-entropy is taken over rows whose mask is 1. The reference code
builds the same mask with per-sample Python loops.

Sampled (`--loss sampled`): the in-batch columns, corrected by log(n p_i) (n: the batch's real slots, so n p_i is
item i's expected count among them), plus M catalogue columns drawn per batch with replacement from q, each
corrected by log(M q_i); a drawn column holding any of the row's user's slot items is masked.
Full (`--loss full`): one column per training item (each exactly once: no correction), the user's other slot
items masked, the positive's column kept.
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
    return _cross_entropy(logits, positives, mask, count)


def _cross_entropy(logits: torch.Tensor, positives: torch.Tensor, mask: torch.Tensor,
                   count: torch.Tensor | None) -> torch.Tensor:
    """The mean cross-entropy over the rows whose mask is 1 (in fp32 at least); with `count`, their sum / count."""
    keep = mask.reshape(-1).bool()
    kept = logits[keep]
    if (count is not None and not int(count)) or (count is None and not len(kept)):
        return logits.sum() * 0.0
    loss = F.cross_entropy(kept.to(torch.promote_types(kept.dtype, torch.float32)), positives[keep],
                           reduction="sum" if count is not None else "mean")
    return loss / count if count is not None else loss


def catalogue_logits(user_states: torch.Tensor, row_ids: torch.Tensor, columns: torch.Tensor,
                     column_embeddings: torch.Tensor, log_count: torch.Tensor) -> torch.Tensor:
    """The logits [b L, M] of M drawn catalogue columns (ids `columns` [M], embeddings [M, d]) for rows of users
    whose slot ids are row_ids [b, L + 1]: H e_c - log_count[c], masked where the column's item is any of the
    row's user's slot items (or padding)."""
    b, L, d = user_states.shape
    logits = user_states.reshape(b * L, d) @ column_embeddings.T - log_count.to(user_states.dtype)[None, :]
    masked = (columns[None, :, None] == row_ids[:, None, :]).any(dim=2) | (columns == 0)[None, :]   # [b, M]
    return logits.masked_fill(masked.repeat_interleave(L, dim=0), MASKED)


def sampled_debiased_loss(user_states: torch.Tensor, item_embeddings: torch.Tensor, ids: torch.Tensor,
                          mask: torch.Tensor, log_popularity: torch.Tensor, columns: torch.Tensor,
                          column_embeddings: torch.Tensor, log_count: torch.Tensor,
                          row_ids: torch.Tensor | None = None, row_offset: int = 0,
                          count: torch.Tensor | None = None) -> torch.Tensor:
    """The in-batch loss's columns (ids [B, L + 1] are the whole batch's slots, as in `inbatch_debiased_loss`)
    plus M catalogue columns: `columns` [M] drawn from q, `log_count` = log(M q[columns])."""
    logits, positives = masked_logits(user_states, item_embeddings, ids, log_popularity, row_ids, row_offset)
    real = (ids != 0).sum().clamp(min=1)
    # log p -> log(n p): the in-batch columns' expected counts, on the scale of the drawn columns' M q
    logits = logits - torch.log(real.to(logits.dtype))
    rows = ids if row_ids is None else row_ids
    extra = catalogue_logits(user_states, rows, columns, column_embeddings, log_count)
    return _cross_entropy(torch.cat([logits, extra], dim=1), positives, mask, count)


def full_softmax_loss(user_states: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, columns: torch.Tensor,
                      column_embeddings: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """Every training item a column once: `columns` [K] (distinct item ids, every positive among them) with
    embeddings [K, d]. ids [b, L + 1] are the rows' users' slots; row (b, j)'s positive is ids[b, j + 1]; the
    user's other slot items are masked."""
    b, L, d = user_states.shape
    column_of = torch.full((int(max(int(columns.max()), int(ids.max()))) + 1,), -1, dtype=torch.long,
                           device=ids.device)
    column_of[columns] = torch.arange(len(columns), device=ids.device)
    logits = user_states.reshape(b * L, d) @ column_embeddings.T
    positives = column_of[ids[:, 1:]].reshape(b * L)          # -1 at padding (those rows are masked out)
    own = column_of[ids]                                       # [b, L + 1] the user's slot items' columns
    masked = torch.zeros(b, len(columns) + 1, dtype=torch.bool, device=ids.device)
    masked.scatter_(1, torch.where(own >= 0, own, len(columns)), True)
    masked = masked[:, :-1].repeat_interleave(L, dim=0)
    safe = positives.clamp(min=0)
    positive_logits = logits.gather(1, safe[:, None])
    logits = logits.masked_fill(masked, MASKED).scatter(1, safe[:, None], positive_logits)
    if bool((positives[mask.reshape(-1).bool()] < 0).any()):
        raise ValueError("full softmax: a positive item has no column (columns must hold every training item)")
    return _cross_entropy(logits, safe, mask, count)
