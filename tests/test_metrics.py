"""Full-ranking evaluation against a slow argsort reference (docs/method.md §4), faithful and fixed, both tie rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluate_reference import argsort_ranks
from iisan.evaluate.metrics import metrics_from_ranks, rank_targets


def random_case(seed: int, users: int = 400, items: int = 120, dim: int = 8, history: int = 12):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(users, dim, generator=g)
    e = torch.randn(items + 1, dim, generator=g)
    targets = torch.randint(1, items + 1, (users,), generator=g)
    hist = torch.randint(1, items + 1, (users, history), generator=g)
    lengths = torch.randint(0, history + 1, (users,), generator=g)
    hist[torch.arange(history)[None, :] < (history - lengths)[:, None]] = 0  # left padding
    repeat = torch.rand(users, generator=g) < 0.2                              # some targets in the history
    hist[repeat, -1] = targets[repeat]
    return u, e, targets, hist


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
@pytest.mark.parametrize("faithful", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_equal_the_argsort_reference(seed, faithful, ties):
    u, e, targets, hist = random_case(seed)
    e[7] = e[3]  # two items with identical embeddings: their scores tie for every user
    result = rank_targets(u, e, targets, hist, mask_target_in_history=faithful, batch_size=37, ties=ties)
    scores = (u @ e.T).numpy()
    expected = argsort_ranks(scores, targets.numpy(), hist.numpy(), faithful, ties)
    assert result.ranks.tolist() == expected.tolist()                    # exact ranks, misses included
    unmasked = ~(faithful & (hist == targets[:, None]).any(1))
    assert result.tied == int((((targets == 3) | (targets == 7)) & unmasked
                               & ~(hist == torch.where(targets == 3, 7, 3)[:, None]).any(1)).sum()) > 0
    assert (expected <= 20).sum() > 10                                     # hits exist to be checked
    repeats = (hist == targets[:, None]).any(1)
    assert repeats.sum() > 10
    if faithful:  # a repeated target is a guaranteed miss
        assert (result.ranks[repeats] > 20).all()


@pytest.mark.slow
@pytest.mark.parametrize("tile", [1, 5, 16, 64])
@pytest.mark.parametrize("faithful", [True, False])
def test_user_by_item_tiles_give_the_ranks_of_the_whole_row(tile, faithful):
    """Scoring in user x item tiles (memory batch x tile) counts every target's exact rank across tiles,
    ties included: the same ranks as the whole score row and as the argsort reference."""
    u, e, targets, hist = random_case(7)
    e[7] = e[3]
    e[100] = e[3]  # ties that cross tiles
    whole = rank_targets(u, e, targets, hist, mask_target_in_history=faithful, batch_size=37)
    tiled = rank_targets(u, e, targets, hist, mask_target_in_history=faithful, batch_size=37, item_tile=tile)
    expected = argsort_ranks((u @ e.T).numpy(), targets.numpy(), hist.numpy(), faithful, "pessimistic")
    assert tiled.ranks.tolist() == whole.ranks.tolist() == expected.tolist()
    assert tiled.tied == whole.tied > 0 and tiled.metrics == whole.metrics
    optimistic = rank_targets(u, e, targets, hist, mask_target_in_history=faithful, batch_size=37, item_tile=tile,
                              ties="optimistic")
    assert optimistic.ranks.tolist() == argsort_ranks((u @ e.T).numpy(), targets.numpy(), hist.numpy(), faithful,
                                                      "optimistic").tolist()


def test_all_equal_scores_rank_last_by_default_and_first_when_optimistic():
    """A model that scores every item the same learns nothing: the default rule ranks its targets after every
    other unmasked item (HR@10 = 0); the optimistic rule would give it HR@10 = 100 %."""
    users, items = 50, 120
    u, e = torch.zeros(users, 4), torch.randn(items + 1, 4)
    targets = torch.arange(users) % items + 1
    hist = torch.zeros(users, 3, dtype=torch.long)
    hist[:, -1] = (targets % items) + 1   # one history item, never the target
    pessimistic = rank_targets(u, e, targets, hist)
    assert pessimistic.ranks.tolist() == [items - 1] * users   # N - 1 others unmasked, all tied
    assert pessimistic.metrics["HR@10"] == 0.0 and pessimistic.tied == users
    optimistic = rank_targets(u, e, targets, hist, ties="optimistic")
    assert optimistic.ranks.tolist() == [1] * users and optimistic.metrics["HR@10"] == 1.0


def test_metric_values():
    ranks = torch.tensor([1, 2, 10, 11, 20, 300])
    m = metrics_from_ranks(ranks)
    assert m["HR@10"] == pytest.approx(3 / 6) and m["HR@5"] == pytest.approx(2 / 6) and m["HR@20"] == pytest.approx(5 / 6)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 6)
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)
                                          + 1 / math.log2(21)) / 6)


def test_report_line():
    u, e, targets, hist = random_case(0)
    line = rank_targets(u, e, targets, hist).line("test")
    assert line.startswith("test HR@10 ") and " NDCG@10 " in line


def test_bootstrap_interval_of_a_mean():

    from iisan.evaluate.report import bootstrap_interval, per_user

    assert bootstrap_interval(np.full(50, 0.25)) == [0.25, 0.25]
    values = (np.random.default_rng(1).random(2000) < 0.3).astype(float)
    lo, hi = bootstrap_interval(values)
    half = 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / len(values))  # the normal approximation
    assert abs(lo - (values.mean() - half)) < 0.003 and abs(hi - (values.mean() + half)) < 0.003
    assert bootstrap_interval(values) == [lo, hi]                              # seeded: reproducible
    assert all(np.isnan(bootstrap_interval(np.array([]))))
    ranks = np.array([1, 3, 10, 11])
    assert per_user(ranks, "HR@10").tolist() == [1, 1, 1, 0]
    assert np.allclose(per_user(ranks, "NDCG@10"), [1, 0.5, 1 / np.log2(11), 0])


@pytest.mark.parametrize("n, block", [(1, 4), (37, 100), (500, 4 * 500 + 3)])
def test_bootstrap_means_drawn_in_blocks_equal_one_draw(monkeypatch, n, block):
    """Resampling in blocks (bounded memory) gives the means of one [samples, n] draw, bit for bit."""

    import iisan.evaluate.report as report

    values = np.random.default_rng(3).random(n)
    rng = np.random.default_rng(7)
    whole = values[rng.integers(0, n, size=(11, n))].mean(axis=1)
    monkeypatch.setattr(report, "BOOTSTRAP_BLOCK", block)   # 4, 2 and 4 resamples per block
    assert np.array_equal(report.bootstrap_means(values, 11, seed=7), whole)
