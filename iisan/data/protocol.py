"""The data protocol of docs/method.md §1.2: filtering, truncation, re-indexing, leave-one-out splits, popularity.

Everything is held as small numpy arrays indexed by user (nanoGPT style): windows are left-padded with 0,
the padding item. Item index i (1..N) is the i-th kept item in items-file order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from iisan.data.readers import ItemTable, UserTable
from iisan.errors import IisanError


@dataclass(frozen=True)
class ProtocolConfig:
    """docs/method.md §1.2 / §8 defaults, and the cold-start variant (§1.2.8)."""

    max_seq_len: int = 10  # L: user-encoder input length
    min_seq_len: int = 5   # users with fewer items (full sequence) are dropped
    cold_items: float = 0.0  # fraction of items withheld from training (0: the usual protocol)
    cold_seed: int = 0       # which items: a hash of the item id with this seed

    def __post_init__(self) -> None:
        if not (self.cold_items == 0.0 or 0.0 < self.cold_items < 1.0):
            raise IisanError(f"--cold-items {self.cold_items}: a fraction in (0, 1), e.g. 0.1 (0: the usual protocol)")

    @property
    def keep_last(self) -> int:
        return self.max_seq_len + 3


def is_cold_item(item_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether the cold-start protocol withholds this item: the first 8 bytes of sha256("<seed>:<item id>"),
    read as a fraction of 2^64, fall below `fraction`. Depends on the id alone, not on any training seed or
    file order."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0 ** 64


def _left_pad(rows: list[list[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        if row:
            out[r, width - len(row):] = row
    return out


@dataclass
class SplitData:
    """The training protocol's view of a dataset."""

    config: ProtocolConfig
    item_ids: list[str]          # item_ids[i - 1] is the raw id of item index i
    user_ids: list[str]
    sequences: list[list[int]]   # truncated sequences, item indices
    train: np.ndarray            # [U, L+1] train sequence s[0:n-2], left-padded
    valid_inputs: np.ndarray     # [U, L]
    valid_target: np.ndarray     # [U]
    test_inputs: np.ndarray      # [U, L]
    test_target: np.ndarray      # [U]
    valid_history: np.ndarray    # [U, L+1] items masked when scoring valid: s[0:n-2]
    test_history: np.ndarray     # [U, L+2] items masked when scoring test: s[0:n-1]
    train_counts: np.ndarray     # [N+1] occurrences in train sequences (repeats count); [0] = 0
    cold_items: frozenset[int] = frozenset()  # item indices the cold-start protocol withheld from training

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def popularity(self) -> np.ndarray:
        """p_i = c_i / sum(c), with p_0 := 1 (docs/method.md §1.2.6)."""
        p = self.train_counts.astype(np.float64) / max(int(self.train_counts.sum()), 1)
        p[0] = 1.0
        return p

    def zero_popularity_items(self) -> int:
        return int((self.train_counts[1:] == 0).sum())

    def warm_targets(self, which: str) -> np.ndarray:
        """[U] bool: whether each user's valid / test target occurs in some training sequence ("warm"); the
        others ("cold") are items an ID model has never been trained on."""
        targets = self.valid_target if which == "valid" else self.test_target
        return self.train_counts[targets] > 0

    def repeat_targets(self) -> tuple[int, int]:
        """Users whose valid / test target already occurs in the history masked for that split."""
        valid = sum(1 for s in self.sequences if s[-2] in s[:-2])
        test = sum(1 for s in self.sequences if s[-1] in s[:-1])
        return valid, test


def apply_protocol(items: ItemTable, users: UserTable, config: ProtocolConfig = ProtocolConfig()) -> SplitData:
    """docs/method.md §1.2 steps 1-6; with `config.cold_items`, §1.2.8: the withheld items are then removed from
    the training sequences only (they stay valid / test targets, model inputs and masked history)."""
    L = config.max_seq_len
    kept_users = [(uid, seq[-config.keep_last:]) for uid, seq in zip(users.ids, users.sequences)
                  if len(seq) >= config.min_seq_len]
    used = {item for _, seq in kept_users for item in seq}
    kept_items = [item for item in items.ids if item in used]  # items-file order
    index = {item: i + 1 for i, item in enumerate(kept_items)}
    sequences = [[index[item] for item in seq] for _, seq in kept_users]

    train_rows, valid_in, test_in, valid_hist, test_hist = [], [], [], [], []
    valid_target, test_target = [], []
    cold = ({index[item] for item in kept_items if is_cold_item(item, config.cold_items, config.cold_seed)}
            if config.cold_items else set())
    for s in sequences:
        n = len(s)
        train_rows.append([i for i in s[: n - 2] if i not in cold])
        valid_window = s[: n - 1][-(L + 1):]
        valid_in.append(valid_window[:-1])
        valid_target.append(s[n - 2])
        test_window = s[-(L + 1):]
        test_in.append(test_window[:-1])
        test_target.append(s[n - 1])
        valid_hist.append(s[: n - 2])
        test_hist.append(s[: n - 1])

    train = _left_pad(train_rows, L + 1)
    counts = np.bincount(train.ravel(), minlength=len(kept_items) + 1).astype(np.int64)
    counts[0] = 0
    return SplitData(
        config=config,
        item_ids=kept_items,
        user_ids=[uid for uid, _ in kept_users],
        sequences=sequences,
        train=train,
        valid_inputs=_left_pad(valid_in, L),
        valid_target=np.asarray(valid_target, dtype=np.int64),
        test_inputs=_left_pad(test_in, L),
        test_target=np.asarray(test_target, dtype=np.int64),
        valid_history=_left_pad(valid_hist, config.keep_last - 2),
        test_history=_left_pad(test_hist, config.keep_last - 1),
        train_counts=counts,
        cold_items=frozenset(cold),
    )
