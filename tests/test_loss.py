"""The vectorised loss against a per-sample loop written straight from docs/method.md §3."""

from __future__ import annotations

import math

import pytest
import torch

from iisan.train.loss import inbatch_debiased_loss, masked_logits


def slow_rows(H, E, ids, log_pop):
    """Every row's masked logits and positive column, one user and position at a time (docs/method.md §3)."""
    B, L, _ = H.shape
    flat_ids = ids.reshape(-1).tolist()
    E_flat = E.reshape(B * (L + 1), -1)
    rows = {}
    for b in range(B):
        user_items = set(ids[b].tolist())
        for j in range(L):
            positive = b * (L + 1) + j + 1
            row = []
            for c, item in enumerate(flat_ids):
                value = float(H[b, j] @ E_flat[c]) - float(log_pop[item])
                if c != positive and (item == 0 or item in user_items):
                    value = -1e4
                row.append(value)
            rows[(b, j)] = (row, positive)
    return rows


def slow_loss(H, E, ids, mask, log_pop):
    total, count = 0.0, 0
    for (b, j), (row, positive) in slow_rows(H, E, ids, log_pop).items():
        if mask[b, j] == 0:
            continue
        m = max(row)
        total += -(row[positive] - m - math.log(sum(math.exp(v - m) for v in row)))
        count += 1
    return total / count


def test_masked_logits_equal_the_per_sample_reference():
    H, E, ids, mask, log_pop = random_batch(1)
    logits, positives = masked_logits(H, E, ids, log_pop)
    L = H.shape[1]
    for (b, j), (row, positive) in slow_rows(H, E, ids, log_pop).items():
        assert positives[b * L + j].item() == positive
        assert torch.allclose(logits[b * L + j], torch.tensor(row, dtype=logits.dtype), atol=1e-12)


def random_batch(seed, B=6, L=10, n_items=15, d=8):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 2, (B,), generator=g)
    ids = torch.randint(1, n_items + 1, (B, L + 1), generator=g)  # small catalogue: duplicates within and across
    for b in range(B):
        ids[b, : L + 1 - lengths[b]] = 0                           # left padding
    mask = (ids[:, 1:] != 0) & (ids[:, :-1] != 0)
    mask = mask.long()
    counts = torch.rand(n_items + 1, generator=g) + 0.1
    log_pop = torch.log(counts / counts[1:].sum())
    log_pop[0] = 0.0
    H = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    E = torch.randn(B, L + 1, d, generator=g, dtype=torch.float64)
    return H, E, ids, mask, log_pop.double()


@pytest.mark.parametrize("seed", range(6))
def test_loss_equals_the_per_sample_reference(seed):
    H, E, ids, mask, log_pop = random_batch(seed)
    assert (ids == 0).any() and len(set(ids[ids > 0].tolist())) < (ids > 0).sum()  # padding and duplicates
    fast = inbatch_debiased_loss(H, E, ids, mask, log_pop)
    assert fast.item() == pytest.approx(slow_loss(H, E, ids, mask, log_pop), rel=1e-9, abs=1e-9)


def test_gradients_flow_to_both_towers():
    H, E, ids, mask, log_pop = random_batch(0)
    H.requires_grad_(True)
    E.requires_grad_(True)
    inbatch_debiased_loss(H, E, ids, mask, log_pop).backward()
    assert H.grad.abs().sum() > 0 and E.grad.abs().sum() > 0
    # Padding slots never receive gradient.
    assert torch.all(E.grad.reshape(-1, E.shape[-1])[ids.reshape(-1) == 0] == 0)


# --- catalogue columns: the sampled and the full softmax (docs/method.md §3) ---------------------------------

def _row_cross_entropy(row, positive):
    m = max(row)
    return -(row[positive] - m - math.log(sum(math.exp(v - m) for v in row)))


def slow_sampled_loss(H, E, ids, mask, log_pop, columns, C, log_count):
    """Per row: the in-batch row of `slow_rows` shifted by log n (the batch's real slots), then one column per
    drawn item, H e - log(M q), masked when the item is any of the user's slot items."""
    B, L, _ = H.shape
    n = int((ids != 0).sum())
    total, count = 0.0, 0
    for (b, j), (row, positive) in slow_rows(H, E, ids, log_pop).items():
        if mask[b, j] == 0:
            continue
        user_items = set(ids[b].tolist())
        row = [v - math.log(n) for v in row]
        for m, item in enumerate(columns.tolist()):
            row.append(-1e4 if item in user_items or item == 0 else float(H[b, j] @ C[m]) - float(log_count[m]))
        total += _row_cross_entropy(row, positive)
        count += 1
    return total / count


def slow_full_loss(H, ids, mask, columns, C):
    B, L, _ = H.shape
    col = {item: k for k, item in enumerate(columns.tolist())}
    total, count = 0.0, 0
    for b in range(B):
        user_items = set(ids[b].tolist())
        for j in range(L):
            if mask[b, j] == 0:
                continue
            positive = col[int(ids[b, j + 1])]
            row = [-1e4 if (item in user_items and k != positive) else float(H[b, j] @ C[k])
                   for k, item in enumerate(columns.tolist())]
            total += _row_cross_entropy(row, positive)
            count += 1
    return total / count


@pytest.mark.parametrize("seed", range(4))
def test_sampled_loss_equals_the_per_row_reference(seed):
    from iisan.train.loss import sampled_debiased_loss

    H, E, ids, mask, log_pop = random_batch(seed)
    g = torch.Generator().manual_seed(100 + seed)
    columns = torch.randint(0, 16, (9,), generator=g)          # repeats, padding and the users' own items
    C = torch.randn(9, H.shape[-1], generator=g, dtype=torch.float64)
    log_count = torch.log(torch.rand(9, generator=g, dtype=torch.float64) * 3 + 0.1)
    assert (columns == 0).any() or seed, "the draw should hold padding in some case"
    fast = sampled_debiased_loss(H, E, ids, mask, log_pop, columns, C, log_count)
    assert fast.item() == pytest.approx(slow_sampled_loss(H, E, ids, mask, log_pop, columns, C, log_count),
                                        rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_full_softmax_equals_the_per_row_reference(seed):
    from iisan.train.loss import full_softmax_loss

    H, _, ids, mask, _ = random_batch(seed)
    g = torch.Generator().manual_seed(200 + seed)
    columns = torch.arange(1, 16)[torch.randperm(15, generator=g)]   # every item once, in any order
    C = torch.randn(15, H.shape[-1], generator=g, dtype=torch.float64)
    fast = full_softmax_loss(H, ids, mask, columns, C)
    assert fast.item() == pytest.approx(slow_full_loss(H, ids, mask, columns, C), rel=1e-9, abs=1e-9)
    with pytest.raises(ValueError, match="no column"):
        full_softmax_loss(H, ids, mask, columns[columns != int(ids[mask.bool().nonzero()[0, 0], 1 + mask.bool().nonzero()[0, 1]])], C[:14])
