"""Slow, obviously-correct references used by the tests."""

from __future__ import annotations

import numpy as np


def argsort_ranks(scores: np.ndarray, targets: np.ndarray, histories: np.ndarray, faithful: bool) -> np.ndarray:
    """Per user: mask the history (all of it when faithful, all but the target otherwise) and column 0, sort
    the items by descending score with ties in the target's favour, and return the target's position."""
    ranks = []
    for s, t, h in zip(scores, targets, histories):
        s = s.astype(np.float64).copy()
        for i in h:
            if i != 0 and (faithful or i != t):
                s[i] = -np.inf
        items = list(range(1, len(s)))
        order = sorted(items, key=lambda i: (-s[i], 0 if i == t else 1))
        ranks.append(order.index(t) + 1)
    return np.asarray(ranks)
