"""Full-ranking evaluation (docs/method.md §4): score every item for every user, mask the history, rank the target.

rank = 1 + the number of other unmasked items scoring higher than the target, or exactly as high (the
default `pessimistic` tie rule; `optimistic` counts only strictly higher scores, resolving ties in the
target's favour). Items with identical content (Scientific has 238 items in 66 groups sharing a title)
score identically in text-only runs, so ties are real; `RankingResult.tied` counts the targets that had one.
Faithful mode (the reference code, default for comparability) masks the whole history, so a target that is
already in the user's history scores -inf and is a guaranteed miss; fixed mode keeps the target unmasked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KS = (5, 10, 20)
TIES = ("pessimistic", "optimistic")


@dataclass
class RankingResult:
    ranks: torch.Tensor                  # [U] 1-based rank of each user's target among all N items
    metrics: dict[str, float]            # HR@K and NDCG@K in [0, 1]
    ties: str = "pessimistic"            # the tie rule the ranks follow
    tied: int = 0                        # targets with at least one other item scoring bit-identically

    warm: torch.Tensor | None = None     # [U] bool: the target occurs in training (see SplitData.warm_targets)

    def groups(self, ks: tuple[int, ...] = KS) -> dict[str, dict[str, float | int | None]]:
        """The metrics of the warm and the cold users separately, each with its user count (`users`); a group
        without users has None metrics. Empty when the result carries no warm mask."""
        if self.warm is None:
            return {}
        out: dict[str, dict[str, float | int | None]] = {}
        for name, mask in (("warm", self.warm), ("cold", ~self.warm)):
            n = int(mask.sum())
            ranks = self.ranks[mask]
            metrics = metrics_from_ranks(ranks, ks) if n else {k: None for k in self.metrics}
            out[name] = {"users": n, **metrics}
        return out

    def line(self, split: str, k: int = 10) -> str:
        """`<split> HR@10 <x> NDCG@10 <y>`, in percent as in docs/method.md §9.2."""
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
                 ks: tuple[int, ...] = KS, ties: str = "pessimistic", item_tile: int | None = None
                 ) -> RankingResult:
    """user_vectors [U, d]; item_table [N + 1, d] (row 0 = padding); targets [U] in 1..N; histories [U, H]
    item indices left-padded with 0. Scores users in batches of `batch_size` (memory [batch, N + 1]); with
    `item_tile` smaller than N + 1, in user × item tiles (memory [batch, item_tile], see `_tiled_counts`).

    The history (and column 0) is masked; with `mask_target_in_history` a target in its own history is masked
    too and so ranks after every unmasked item (a guaranteed miss). The rank counts, over the whole score row,
    the other unmasked items scoring strictly higher, plus (`ties="pessimistic"`, the default) those scoring
    exactly the same: so ties never help the target, and a model scoring everything equal ranks it last.
    `ties="optimistic"` leaves ties out (the rule before issue 12). `tied` counts the targets with at least
    one bit-identical tie."""
    if ties not in TIES:
        raise ValueError(f"ties '{ties}' not one of {', '.join(TIES)}")
    device = item_table.device
    ranks = torch.empty(len(targets), dtype=torch.long)
    tied = 0
    tiled = item_tile is not None and item_tile < len(item_table)
    block = None  # one score block, reused by every batch (a fresh one each time costs its page faults)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        u = user_vectors[start:stop].to(device)
        t = targets[start:stop].to(device)[:, None]
        h = histories[start:stop].to(device)
        excluded, first = _excluded_columns(h, t)
        in_history = (h == t).any(dim=1, keepdim=True) if mask_target_in_history else None
        width = item_tile if tiled else len(item_table)
        if block is None or block.shape[0] < len(u) or block.dtype != u.dtype:
            block = torch.empty(min(batch_size, len(targets)), width, dtype=u.dtype, device=device)
        if tiled:
            above, equal = _tiled_counts(u, item_table, t, in_history, excluded, first, item_tile, block)
        else:
            scores = torch.mm(u, item_table.T, out=block[:len(u)])       # [b, N + 1]
            target = scores.gather(1, t)
            if in_history is not None:
                target = target.masked_fill(in_history, float("-inf"))
            above, equal = _counts(scores, target, excluded, first)
        tied += int((equal > 0).sum())
        ranks[start:stop] = (1 + above + (equal if ties == "pessimistic" else 0)).cpu()
    return RankingResult(ranks, metrics_from_ranks(ranks, ks), ties, tied)


def _excluded_columns(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's columns that are no rival of the target: padding 0, the history and the target itself,
    sorted [b, H + 2], with `first` marking each distinct column once."""
    excluded = torch.cat([torch.zeros_like(t), h, t], dim=1).sort(dim=1).values
    first = torch.ones_like(excluded, dtype=torch.bool)
    first[:, 1:] = excluded[:, 1:] != excluded[:, :-1]
    return excluded, first


# Columns compared per step when counting on CPU: the 0/1 flags of a [batch, COUNT_BLOCK] block stay in cache.
COUNT_BLOCK = 8192


def _above_equal(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the columns of `scores` scoring above / exactly as `target` [b, 1]. The comparisons are written
    as 0.0 / 1.0 into a float block and summed there (several times faster on CPU than summing a bool
    tensor); each block's sum is an integer below 2^24, exact in float32, and the blocks add up in float64."""
    b, width = scores.shape
    step = width if scores.is_cuda else min(width, COUNT_BLOCK)
    flags = torch.empty(b, step, dtype=torch.float32, device=scores.device)
    above = torch.zeros(b, dtype=torch.float64, device=scores.device)
    equal = torch.zeros_like(above)
    for c in range(0, width, step):
        part = scores[:, c:c + step]
        f = flags[:, :part.shape[1]]
        above += torch.gt(part, target, out=f).sum(dim=1)
        equal += torch.eq(part, target, out=f).sum(dim=1)
    return above.long(), equal.long()


def _counts(scores: torch.Tensor, target: torch.Tensor, excluded: torch.Tensor, first: torch.Tensor,
            offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns offset .. offset + width of a score block scoring above / exactly as each target, minus the
    excluded columns among them: one pass over the block (the excluded columns are few, gathered)."""
    above, equal = _above_equal(scores, target)
    width = scores.shape[1]
    local = excluded - offset
    inside = (local >= 0) & (local < width) & first
    values = scores.gather(1, local.clamp(0, width - 1))
    above -= ((values > target) & inside).sum(dim=1)
    equal -= ((values == target) & inside).sum(dim=1)
    return above, equal


def _tiled_counts(u: torch.Tensor, item_table: torch.Tensor, t: torch.Tensor, in_history: torch.Tensor | None,
                  excluded: torch.Tensor, first: torch.Tensor, tile: int, block: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The counts of rank_targets (other unmasked items scoring above / exactly as the target) over item tiles
    of `tile` columns, never holding more than [batch, tile] scores (in `block`). Two passes: the first takes
    each target's score from the tile that holds it (the same product as the second pass's, so ties stay
    bit-identical; only the tiles holding a target are computed), the second counts, tile by tile, against it.
    The last tile the first pass computed is still in `block` and is counted from there, not computed again: with
    the users in target order (train/recipe.py, evaluate) a batch's targets mostly lie in one tile, so a batch
    costs about one product per tile."""
    n = len(item_table)
    target = torch.empty(len(u), device=u.device, dtype=u.dtype)
    kept = None  # (start, scores) of the first pass's last product
    for a in range(0, n, tile):
        inside = ((t[:, 0] >= a) & (t[:, 0] < a + tile)).nonzero()[:, 0]
        if len(inside):  # the whole batch's product, as in the second pass: a subset's could round otherwise
            scores = _tile_product(u, item_table, a, tile, block)
            # each row's own column (clamped for the rows outside, which are dropped), not a copy of their rows
            target[inside] = scores.gather(1, (t - a).clamp(0, scores.shape[1] - 1))[inside, 0]
            kept = (a, scores)
    target = target[:, None]
    if in_history is not None:
        target = target.masked_fill(in_history, float("-inf"))
    above = torch.zeros(len(u), dtype=torch.long, device=u.device)
    equal = torch.zeros_like(above)
    starts = list(range(0, n, tile))
    if kept is not None:  # counted first, before the block is overwritten (the counts are integer sums)
        starts.remove(kept[0])
        starts.insert(0, kept[0])
    for a in starts:
        scores = kept[1] if kept is not None and a == kept[0] else _tile_product(u, item_table, a, tile, block)
        more, same = _counts(scores, target, excluded, first, a)
        above += more
        equal += same
    return above, equal


def _tile_product(u: torch.Tensor, item_table: torch.Tensor, a: int, tile: int, block: torch.Tensor) -> torch.Tensor:
    """The scores of the users `u` against items a .. a + tile, written into `block`'s memory (a contiguous
    [users, items] view of it, also for the last, narrower tile: no fresh block per batch)."""
    part = item_table[a:a + tile]
    return torch.mm(u, part.T, out=block.view(-1)[:len(u) * len(part)].view(len(u), len(part)))
