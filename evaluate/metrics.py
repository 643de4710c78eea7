"""Full-ranking evaluation (SPEC §4): score every item for every user, mask the history, rank the target.

rank = 1 + the number of items scoring strictly higher than the target. Ties (rare with float scores) are
therefore resolved in the target's favour; items masked to -inf never outrank a finite target.
Faithful mode (the reference code, default for comparability) masks the whole history, so a target that is
already in the user's history scores -inf and is a guaranteed miss; fixed mode keeps the target unmasked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KS = (5, 10, 20)


@dataclass
class RankingResult:
    ranks: torch.Tensor                  # [U] 1-based rank of each user's target among all N items
    metrics: dict[str, float]            # HR@K and NDCG@K in [0, 1]

    def line(self, split: str, k: int = 10) -> str:
        """`<split> HR@10 <x> NDCG@10 <y>`, in percent as in SPEC §9.2."""
        return f"{split} HR@{k} {100 * self.metrics[f'HR@{k}']:.2f} NDCG@{k} {100 * self.metrics[f'NDCG@{k}']:.2f}"


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    ranks = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1.0), torch.zeros_like(ranks)).mean().item()
    return out


def rank_targets(user_vectors: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                 histories: torch.Tensor, mask_target_in_history: bool = True, batch_size: int = 2048,
                 ks: tuple[int, ...] = KS) -> RankingResult:
    """user_vectors [U, d]; item_table [N + 1, d] (row 0 = padding); targets [U] in 1..N; histories [U, H]
    item indices left-padded with 0. Scores users in batches of `batch_size` (memory [batch, N + 1]).

    Only ranks up to max(ks) matter to HR@K / NDCG@K, so each user's top max(ks) + H + 1 columns are taken
    (`topk`, about 4x cheaper than comparing all N scores): at most H + 1 of them are masked (history and
    the padding column), so every unmasked item that outranks the target within the cut-off is among them.
    `ranks` holds the exact rank up to max(ks) and max(ks) + 1 for every miss."""
    device = item_table.device
    cutoff = max(ks)
    ranks = torch.empty(len(targets), dtype=torch.long)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        u = user_vectors[start:stop].to(device)
        t = targets[start:stop].to(device)
        h = histories[start:stop].to(device)
        scores = u @ item_table.T                                         # [b, N + 1]
        target_scores = scores.gather(1, t[:, None])                      # [b, 1]
        depth = min(cutoff + h.shape[1] + 1, scores.shape[1])
        top_scores, top_items = torch.topk(scores, depth, dim=1)
        masked = (top_items == 0) | ((top_items[:, :, None] == h[:, None, :]) & (h[:, None, :] != 0)).any(-1)
        if not mask_target_in_history:
            masked &= top_items != t[:, None]
        above = ((top_scores > target_scores) & ~masked).sum(dim=1)
        rank = torch.clamp(1 + above, max=cutoff + 1)
        if mask_target_in_history:  # a target already in the history scores -inf: a guaranteed miss
            in_history = ((h == t[:, None]) & (h != 0)).any(dim=1)
            rank = torch.where(in_history, torch.full_like(rank, cutoff + 1), rank)
        ranks[start:stop] = rank.cpu()
    return RankingResult(ranks, metrics_from_ranks(ranks, ks))
