"""A trained run, loaded to be used: every item with cached states embedded through the run's item tower (also
items the training protocol dropped, and items added to the store later), the user encoder over any history,
and top-k recommendations. `iisan recommend`, `iisan export`, `iisan serve` and the Python API (`iisan.api`)
all go through `load_run` and `TrainedRun`.

Items are numbered in the dataset's item file order: universe index j (1-based, 0 = padding) is
`dataset.items.ids[j - 1]`. Cached methods rank every one of them; an ID model (sasrec-id) and the end-to-end
methods rank the items their training protocol kept (they have no cached states to embed others from).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from iisan.errors import IisanError
from iisan.train.config import TrainConfig
from iisan.train.methods import ItemSource

SPLITS = ("next", "valid", "test")


class RecommendError(IisanError):
    """A request a trained run cannot answer: unknown ids, a bad k, an empty history."""


@dataclass
class Recommendation:
    id: str
    title: str
    score: float


@dataclass
class TrainedRun:
    run_dir: Path
    cfg: TrainConfig
    seed: int
    setup: "object"                 # iisan.train.recipe.Setup: dataset, split, slots
    model: torch.nn.Module          # iisan.train.model.Recommender, in eval mode
    item_ids: list[str]             # the ranked items: item_ids[j - 1] has universe index j
    table: torch.Tensor             # [M + 1, d] item embeddings, row 0 = padding
    embeds_content: bool            # whether items outside the training protocol could be embedded
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.index = {item: j + 1 for j, item in enumerate(self.item_ids)}
        # what user vectors are ranked against (the table itself for dot products; unit rows for cosine)
        self.ranking = self.model.ranking_table(self.table)
        titles = self.setup.dataset.items.fields.get("title")
        position = self.setup.dataset.items.position
        self.titles = [titles[position[i]] if titles is not None and i in position else "" for i in self.item_ids]

    @property
    def dataset(self):
        return self.setup.dataset

    @property
    def split(self):
        return self.setup.split

    # --- items -----------------------------------------------------------------------------------------------
    def item_embeddings(self) -> tuple[list[str], torch.Tensor]:
        """The raw item ids and their embeddings [M, d] (what scores are inner products with: for a cosine run,
        unit rows)."""
        return list(self.item_ids), self.ranking[1:].clone()

    def embed_items(self, item_ids: Sequence[str]) -> torch.Tensor:
        """The embeddings [n, d] of these items (raw ids), as the run's item tower gives them."""
        return self.ranking[torch.tensor(self._indices(list(item_ids)), dtype=torch.long, device=self.table.device)]

    def item(self, item_id: str) -> dict[str, object]:
        j = self._indices([item_id])[0]
        return {"id": item_id, "title": self.titles[j - 1], "index": j}

    def _indices(self, items: Sequence[str]) -> list[int]:
        unknown = [i for i in items if i not in self.index]
        if unknown:
            shown = _listed(unknown)
            why = ("" if self.embeds_content else
                   f" ({self.cfg.method} ranks only the items its training kept: it cannot embed others)")
            raise RecommendError(f"unknown item id(s) {shown}: not among the {len(self.item_ids):,} items of "
                                 f"{self.run_dir}{why}")
        return [self.index[i] for i in items]

    # --- users -----------------------------------------------------------------------------------------------
    def user_vectors(self, windows: torch.Tensor) -> torch.Tensor:
        """[U, L] left-padded universe indices -> [U, d], as scores take them (for a cosine run: unit length over
        the temperature, so that a score is cos / temperature)."""
        out = [self.model.scored(self.model.user_vectors(windows[i:i + 4096], self.table), users=True)
               for i in range(0, len(windows), 4096)]
        return torch.cat(out) if out else torch.empty(0, self.table.shape[1])

    def window(self, indices: Sequence[int]) -> list[int]:
        """The user encoder's input: the last max_seq_len items, left-padded with 0."""
        last = list(indices)[-self.cfg.max_seq_len:]
        return [0] * (self.cfg.max_seq_len - len(last)) + last

    def dataset_requests(self, users: Sequence[str] | None, split: str = "next"
                         ) -> tuple[list[str], torch.Tensor, list[list[int]]]:
        """(user ids, input windows [U, L], the items to exclude per user) of dataset users (None: every user
        the protocol keeps). `next`: each user's whole sequence is the input and the whole history is excluded
        (deployment); `valid` / `test`: the evaluation's inputs and masked histories."""
        if split not in SPLITS:
            raise RecommendError(f"split '{split}': one of {', '.join(SPLITS)}")
        sp = self.split
        position = {u: n for n, u in enumerate(sp.user_ids)}
        if users is None:
            users = list(sp.user_ids)
        raw = {u: seq for u, seq in zip(self.dataset.users.ids, self.dataset.users.sequences)}
        unknown = [u for u in users if u not in (position if split != "next" else raw)]
        if unknown:
            shown = _listed(unknown)
            where = "the evaluation's users (the protocol keeps users with enough interactions)" if split != "next" \
                else f"the users of {self.dataset.users.path}"
            raise RecommendError(f"unknown user id(s) {shown}: not among {where}")
        to_universe = self._protocol_to_universe()
        windows, exclude = [], []
        for u in users:
            if split == "next":
                history = [self.index[i] for i in raw[u] if i in self.index]
                windows.append(self.window(history))
                exclude.append(history)
            else:
                n = position[u]
                inputs = sp.valid_inputs[n] if split == "valid" else sp.test_inputs[n]
                masked = sp.valid_history[n] if split == "valid" else sp.test_history[n]
                windows.append(to_universe[inputs].tolist())
                exclude.append([int(j) for j in to_universe[masked] if j])
        return list(users), torch.tensor(windows, dtype=torch.long, device=self.table.device), exclude

    def _protocol_to_universe(self) -> np.ndarray:
        out = np.zeros(self.split.n_items + 1, dtype=np.int64)
        for i, item in enumerate(self.split.item_ids, 1):
            out[i] = self.index.get(item, 0)
        return out

    # --- recommendations -------------------------------------------------------------------------------------
    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10, include_history: bool = False
                  ) -> list[list[Recommendation]]:
        """Top-k items for ad-hoc histories of raw item ids (oldest first); history items are excluded unless
        `include_history`."""
        if not histories or any(len(h) == 0 for h in histories):
            raise RecommendError("a history needs at least one item id")
        indices = [self._indices(list(h)) for h in histories]
        windows = torch.tensor([self.window(h) for h in indices], dtype=torch.long, device=self.table.device)
        return self.rank(windows, [] if include_history else indices, k)

    def rank(self, windows: torch.Tensor, exclude: Sequence[Sequence[int]], k: int = 10,
             batch_size: int = 1024) -> list[list[Recommendation]]:
        """Top-k over every ranked item for each input window, the `exclude` items (and padding) left out, ties
        broken by the lower universe index."""
        n_items = len(self.item_ids)
        if not 1 <= k <= n_items:
            raise RecommendError(f"k {k}: between 1 and the {n_items:,} ranked items")
        out: list[list[Recommendation]] = []
        for start in range(0, len(windows), batch_size):
            users = self.user_vectors(windows[start:start + batch_size])
            scores = users @ self.ranking.T
            scores[:, 0] = float("-inf")
            rows = exclude[start:start + batch_size] if exclude else []
            width = max((len(items) for items in rows), default=0)
            if width:  # padded with 0, the padding column, already -inf
                padded = torch.zeros(len(rows), width, dtype=torch.long)
                for r, items in enumerate(rows):
                    padded[r, :len(items)] = torch.as_tensor(list(items), dtype=torch.long)
                scores.scatter_(1, padded.to(scores.device), float("-inf"))
            top = topk_by_index(scores, k)
            values = scores.gather(1, top).cpu()
            for r in range(len(top)):
                out.append([Recommendation(self.item_ids[j - 1], self.titles[j - 1], float(v))
                            for j, v in zip(top[r].tolist(), values[r].tolist()) if v != float("-inf")])
        return out


def _listed(ids: Sequence[str], n: int = 5) -> str:
    return ", ".join(repr(i) for i in ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def topk_by_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, ties broken by the lower index (deterministic, unlike topk)."""
    values, index = torch.topk(scores, k, dim=1)
    threshold = values[:, -1:]
    # Rows with a tie at the k-th score (more than k items at or above it) or inside the top k: ordered by
    # (-score, index) below.
    tied = ((scores >= threshold).sum(dim=1) > k) | (values[:, 1:] == values[:, :-1]).any(dim=1)
    for row in tied.nonzero().flatten().tolist():
        # only the items at or above the k-th score can be in the top k: order those by (-score, index)
        candidates = (scores[row] >= threshold[row]).nonzero().flatten()        # ascending index
        order = torch.sort(scores[row, candidates], descending=True, stable=True).indices[:k]
        index[row] = candidates[order]
    return index


def load_run(run_dir: str | Path, seed: int | None = None, device: str = "auto") -> TrainedRun:
    """A finished run's best checkpoint (of `seed`, default its first seed), every item embedded."""
    import dataclasses

    from iisan.train.recipe import load_best, run_config, setup

    cfg = run_config(Path(run_dir))
    run_dir = Path(run_dir)
    if device != "auto":
        cfg = dataclasses.replace(cfg, device=device)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise RecommendError(f"{run_dir}: no seed {seed} (its seeds: {', '.join(map(str, seeds))})")
    s = setup(dataclasses.replace(cfg, progress=False))
    model = load_best(s, run_dir, seed)
    with torch.no_grad():
        if s.method.items is ItemSource.CACHED:
            from iisan.train.recipe import load_standardization

            item_ids, table = _content_table(s, model, load_standardization(run_dir))
            content = True
        else:
            item_ids, table, content = list(s.split.item_ids), model.item_table(), False
    return TrainedRun(run_dir, cfg, seed, s, model, item_ids, table, content)


def _content_table(s, model, statistics) -> tuple[list[str], torch.Tensor]:
    """Every item of the dataset embedded from its cached states through the run's item tower: the states read
    for the dataset's whole item list (each slot's store must hold them all), standardised with the run's
    statistics (or, for a run written before they were saved, the same statistics recomputed)."""
    from iisan.train.data import load_slot, slot_sources

    cfg = s.cfg
    # Items appended to the items file after a store was written are ranked once the store is extended.
    stored = min(x.manifest.rows - 1 for x in s.slots.values())
    items = list(s.dataset.items.ids[:stored])
    if stored < len(s.dataset.items.ids):
        print(f"{len(s.dataset.items.ids) - stored:,} items appended to {s.dataset.items.path} are not in the "
              f"caches yet (iisan extract on the same store adds them); ranking the {stored:,} cached items",
              file=sys.stderr)
    states = {}
    for slot, source in slot_sources(cfg).items():
        stats = statistics.get(slot) or s.slots[slot].statistics
        loaded = load_slot(cfg, s.dataset, s.split, slot, source, s.device, final=s.method.reads == "final",
                           item_ids=items, statistics=stats)
        states[slot] = loaded.states
    protocol = {item: i for i, item in enumerate(s.split.item_ids, 1)}
    trained = torch.tensor([0] + [protocol.get(item, 0) for item in items], dtype=torch.long, device=s.device)
    batch = getattr(model.items, "table_batch_size", 4096)
    parts = []
    for start in range(0, len(items) + 1, batch):
        rows = slice(start, min(start + batch, len(items) + 1))
        parts.append(model.items.embed_states({slot: x[rows].float() for slot, x in states.items()}, trained[rows]))
    table = torch.cat(parts)
    table[0] = 0
    return items, table
