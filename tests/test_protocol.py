"""docs/method.md §1.2 protocol: a hand-checked example, a slow reference on random data, and the real datasets."""

from __future__ import annotations

import random

import numpy as np

from iisan.data.dataset import dataset_stats, load_dataset
from iisan.data.protocol import ProtocolConfig, apply_protocol
from iisan.data.readers import ItemTable, UserTable

from conftest import SCIENTIFIC, needs_posters, needs_scientific


def tables(item_ids, sequences):
    items = ItemTable(None, list(item_ids), {"title": [""] * len(item_ids)}, list(range(1, len(item_ids) + 1)))
    users = UserTable(None, [f"u{i}" for i in range(len(sequences))], [list(s) for s in sequences])
    return items, users


def test_hand_checked_example():
    # 15 items; u0 has 15 interactions (truncated to the last 13), u1 has 4 (dropped), u2 has 5.
    ids = [f"i{k}" for k in range(15)]
    u0 = [f"i{k}" for k in range(15)]                # keeps i2..i14
    u1 = ["i0", "i1", "i0", "i1"]                    # < 5: dropped, so i0/i1 vanish
    u2 = ["i14", "i3", "i3", "i5", "i14"]
    split = apply_protocol(*tables(ids, [u0, u1, u2]))
    assert split.item_ids == [f"i{k}" for k in range(2, 15)]  # items-file order, i0 and i1 unused
    assert split.user_ids == ["u0", "u2"]
    idx = {item: i + 1 for i, item in enumerate(split.item_ids)}  # i2 -> 1, ..., i14 -> 13
    assert split.sequences[0] == list(range(1, 14))
    assert split.sequences[1] == [13, 2, 2, 4, 13]
    assert split.n_interactions == 18
    # u0: n = 13. train = s[0:11]; valid window = last 11 of s[0:12]; test window = last 11 of s.
    assert split.train[0].tolist() == list(range(1, 12))
    assert split.valid_inputs[0].tolist() == list(range(2, 12)) and split.valid_target[0] == 12
    assert split.test_inputs[0].tolist() == list(range(3, 13)) and split.test_target[0] == 13
    assert split.valid_history[0].tolist() == list(range(1, 12))
    assert split.test_history[0].tolist() == list(range(1, 13))
    # u2: n = 5, left-padded with 0.
    assert split.train[1].tolist() == [0] * 8 + [13, 2, 2]
    assert split.valid_inputs[1].tolist() == [0] * 7 + [13, 2, 2] and split.valid_target[1] == idx["i5"]
    assert split.test_inputs[1].tolist() == [0] * 6 + [13, 2, 2, 4] and split.test_target[1] == 13
    # Test target i14 (13) occurs in u2's history; valid target i5 does not.
    assert split.repeat_targets() == (0, 1)
    # Train counts: u0 train items 1..11 once; u2 train 13, 2, 2.
    expected = np.zeros(14, dtype=np.int64)
    expected[1:12] += 1
    expected[13] += 1
    expected[2] += 2
    assert split.train_counts.tolist() == expected.tolist()
    assert split.zero_popularity_items() == 1  # item 12 (i13) is only ever a valid/test target
    p = split.popularity()
    assert p[0] == 1.0 and np.isclose(p[1:].sum(), 1.0) and np.isclose(p[2], 3 / 14)


def reference(item_ids, sequences, L=10, min_len=5):
    """Straight from docs/method.md §1.2, one user at a time."""
    seqs = [s[-(L + 3):] for s in sequences if len(s) >= min_len]
    kept = [i for i in item_ids if any(i in s for s in seqs)]
    index = {item: k + 1 for k, item in enumerate(kept)}
    out = []
    for s in seqs:
        s = [index[i] for i in s]
        n = len(s)
        valid_window = s[0:n - 1][-(L + 1):]
        test_window = s[-(L + 1):]
        out.append(dict(train=s[0:n - 2], valid_in=valid_window[:-1], valid_t=s[n - 2], test_in=test_window[:-1],
                        test_t=s[n - 1], valid_h=s[0:n - 2], test_h=s[0:n - 1]))
    return kept, out


def unpad(row):
    row = list(row)
    while row and row[0] == 0:
        row.pop(0)
    return row


def test_matches_slow_reference_on_random_data():
    rng = random.Random(7)
    for trial in range(20):
        L = rng.choice([3, 5, 10])
        ids = [f"x{k}" for k in range(rng.randint(5, 40))]
        sequences = [[rng.choice(ids) for _ in range(rng.randint(0, 30))] for _ in range(rng.randint(1, 30))]
        if not any(len(s) >= 5 for s in sequences):
            sequences.append(ids[:5])
        split = apply_protocol(*tables(ids, sequences), ProtocolConfig(max_seq_len=L))
        kept, ref = reference(ids, sequences, L)
        assert split.item_ids == kept
        assert split.n_users == len(ref)
        for u, r in enumerate(ref):
            assert unpad(split.train[u]) == r["train"]
            assert unpad(split.valid_inputs[u]) == r["valid_in"] and split.valid_target[u] == r["valid_t"]
            assert unpad(split.test_inputs[u]) == r["test_in"] and split.test_target[u] == r["test_t"]
            assert unpad(split.valid_history[u]) == r["valid_h"]
            assert unpad(split.test_history[u]) == r["test_h"]
        counts = np.zeros(len(kept) + 1, dtype=np.int64)
        for r in ref:
            for i in r["train"]:
                counts[i] += 1
        assert split.train_counts.tolist() == counts.tolist()


@needs_scientific
def test_scientific_numbers():
    dataset = load_dataset("scientific", folder=SCIENTIFIC)
    s = dataset_stats(dataset)
    assert (s.users, s.items, s.interactions) == (12_076, 20_314, 81_711)
    assert s.zero_popularity_items == 4_008
    assert (s.repeat_valid, s.repeat_test) == (723, 621)
    assert (s.file_items, s.file_interactions) == (20_825, 85_211)
    assert s.items_with_image == 0
    assert dataset.report.messages() == []


def test_ml100k_numbers(ml100k_dir):
    s = dataset_stats(load_dataset("ml-100k", folder=ml100k_dir))
    assert (s.users, s.items, s.interactions) == (943, 1_304, 12_259)
    assert s.zero_popularity_items == 41
    assert (s.repeat_valid, s.repeat_test) == (0, 0)
    assert (s.file_items, s.file_users, s.file_interactions) == (1_682, 943, 100_000)


@needs_posters
def test_ml100k_posters(ml100k_dir):
    s = dataset_stats(load_dataset("ml-100k", folder=ml100k_dir))
    assert s.items_with_image == 1_260
    assert s.file_items_with_image == 1_612


def test_cold_items_are_withheld_from_training_only():
    import pytest

    from iisan.data.protocol import is_cold_item
    from iisan.errors import IisanError

    rng = random.Random(3)
    ids = [f"item{k}" for k in range(400)]
    sequences = [[rng.choice(ids) for _ in range(rng.randint(5, 20))] for _ in range(300)]
    usual = apply_protocol(*tables(ids, sequences))
    cold = apply_protocol(*tables(ids, sequences), ProtocolConfig(cold_items=0.1, cold_seed=0))
    withheld = {i + 1 for i, item in enumerate(usual.item_ids) if is_cold_item(item, 0.1, 0)}
    assert cold.cold_items == withheld and len(withheld) == 35  # of 400 kept items: the hash, not a sample
    # Everything but the training rows is the usual protocol's.
    assert cold.item_ids == usual.item_ids and cold.sequences == usual.sequences
    for name in ("valid_inputs", "valid_target", "test_inputs", "test_target", "valid_history", "test_history"):
        assert np.array_equal(getattr(cold, name), getattr(usual, name)), name
    # Training rows: the usual rows with the withheld items taken out, left-padded again.
    for row, base in zip(cold.train.tolist(), usual.train.tolist()):
        kept = [i for i in base if i and i not in withheld]
        assert row == [0] * (len(row) - len(kept)) + kept
    assert all(cold.train_counts[i] == 0 for i in withheld)
    assert int((~cold.warm_targets("test")).sum()) >= sum(t in withheld for t in usual.test_target.tolist())
    # The choice depends on the id and the cold seed alone.
    assert is_cold_item("item7", 0.1, 0) == is_cold_item("item7", 0.1, 0)
    other = apply_protocol(*tables(ids, sequences), ProtocolConfig(cold_items=0.1, cold_seed=1))
    assert other.cold_items != cold.cold_items
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(IisanError, match=r"--cold-items .*a fraction in \(0, 1\)"):
            ProtocolConfig(cold_items=bad)
