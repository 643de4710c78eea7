"""Slow, obviously-correct references used by the tests."""

from __future__ import annotations

import numpy as np


def argsort_ranks(scores: np.ndarray, targets: np.ndarray, histories: np.ndarray, faithful: bool,
                  ties: str = "optimistic") -> np.ndarray:
    """Per user: mask the history (all of it when faithful, all but the target otherwise) and column 0, sort
    the items by descending score with ties in the target's favour (optimistic) or against it (pessimistic),
    and return the target's position."""
    ranks = []
    for s, t, h in zip(scores, targets, histories):
        s = s.astype(np.float64).copy()
        for i in h:
            if i != 0 and (faithful or i != t):
                s[i] = -np.inf
        # Masked items leave the ranking; a masked target stays, at -inf, after every unmasked item.
        items = [i for i in range(1, len(s)) if i == t or np.isfinite(s[i])]
        first = 0 if ties == "optimistic" else 2
        order = sorted(items, key=lambda i: (-s[i], first if i == t else 1))
        ranks.append(order.index(t) + 1)
    return np.asarray(ranks)
