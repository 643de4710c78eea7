"""Stage-2 data: the protocol splits and the cached states each modality slot reads, in memory.

Cached states are loaded once, re-ordered into the trainer's item index (row i = item index i, row 0 =
padding) through the cache's `item_ids`, optionally standardised with statistics of the items that occur in
training (per layer and dimension, or per layer). Batches are rows of the in-memory train array, shuffled
each epoch. With `--cache-mode mmap` the states live in a memory-mapped .npy file beside the store instead
(`mapped_slot_states`), and batches gather their rows from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from iisan.cache_store import CacheExpectation, find_store, load_cache, mapped_states, open_cache, store_path
from iisan.cache_store.manifest import Manifest
from iisan.data.dataset import Dataset
from iisan.data.protocol import SplitData
from iisan.errors import IisanError
from iisan.extract.layers import select_layers
from iisan.extract.refs import store_name
from iisan.train.config import TrainConfig
from iisan.train.san import Slot

# What `--standardize auto` applies to decoder-LLM caches (encoder and vision caches stay raw); chosen by
# valid HR@10 of SmolLM2-135M states (docs/method.md §6.2).
DECODER_STANDARDIZE = "dim"


@dataclass
class SlotStates:
    slot: str                  # a Slot value: text, image or text2
    source: str                # MODEL or MODEL@FIELD
    path: Path
    manifest: Manifest
    layers: list[int]          # hidden-state indices read ([] when the final output is read instead)
    states: torch.Tensor       # [N + 1, K, D], the cache's storage dtype (fp32 when standardised)
    standardized: str          # off | dim | layer
    init_from_first: bool = False  # remove_first: states[:, 0] is h_0, the intra tower's initial state
    statistics: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) applied when standardised


@dataclass(frozen=True)
class SlotSource:
    """Where a slot's states come from: a model ref (a registered name, hf:ORG/NAME or a path) and, for a text
    slot, the item field it encodes; `--text MODEL@FIELD` on the command line, parsed once here."""
    slot: str
    model: str
    field: str | None = None

    @classmethod
    def parse(cls, slot: str, spelling: str) -> "SlotSource":
        model, _, field = spelling.partition("@")
        if not model.strip():
            raise IisanError(f"--{slot} '{spelling}': give MODEL or MODEL@FIELD")
        return cls(slot, model, field or None)

    @property
    def kind(self) -> str:
        """The kind of states the slot takes: image for the image slot, else text."""
        return slot_kind(self.slot)

    def __str__(self) -> str:
        return self.model + (f"@{self.field}" if self.field else "")


def slot_sources(cfg: TrainConfig) -> dict[str, SlotSource]:
    """Slot -> its source: text, and image or text2 when the config names one."""
    slots = {Slot.TEXT.value: cfg.text}
    if cfg.image:
        slots[Slot.IMAGE.value] = cfg.image
    elif cfg.text2:
        slots[Slot.TEXT2.value] = cfg.text2
    return {slot: SlotSource.parse(slot, spelling) for slot, spelling in slots.items()}


def layer_rule(cfg: TrainConfig, slot: str) -> str:
    return cfg.layers_text if slot == Slot.TEXT.value else cfg.layers_image


def slot_kind(slot: str) -> str:
    return "image" if slot == Slot.IMAGE.value else "text"


def slot_store(cfg: TrainConfig, dataset: str, source: SlotSource) -> tuple[Path | None, str]:
    """The store `iisan extract --model MODEL [--field FIELD]` wrote for a slot's source (None if there is
    none), and its model name (`refs.store_name` of the ref; one tower of a two-tower model, of the slot's
    kind, is found too)."""
    names = [store_name(source.model), store_name(source.model, source.kind)]
    for name in names:
        found = find_store(cfg.cache, dataset, name, source.field)
        if found is not None:
            return found, name
    return None, names[0]


def _find_store(cfg: TrainConfig, dataset: str, source: SlotSource) -> tuple[Path, str]:
    found, name = slot_store(cfg, dataset, source)
    if found is not None:
        return found, name
    extract = (f"iisan extract --model {source.model} --dataset {dataset}"
               + (f" --field {source.field}" if source.field else ""))
    raise IisanError(f"no cache for {source} on {dataset} at {store_path(cfg.cache, dataset, name, source.field)}: "
                     f"run `{extract}` first (or pass --cache-dir with the root it was written to)")


def load_slot(cfg: TrainConfig, dataset: Dataset, split: SplitData, slot: str, source: SlotSource,
              device: torch.device, final: bool = False, item_ids: list[str] | None = None,
              statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> SlotStates:
    """One slot's cached states: the layers its rule selects (`final`: the model's final output instead, as
    one state per item), in the trainer's item order (or for `item_ids`, e.g. every item of the dataset),
    standardised as the config says: with the statistics of the split's training items, or `statistics`
    (those a run saved)."""
    path, name = _find_store(cfg, dataset.name, source)
    with open_cache(path) as store:
        manifest = store.manifest
    if manifest.fingerprint_inputs.get("images") and not dataset.images.paths:
        raise IisanError(f"dataset '{dataset.name}' has no images, but the pipeline feeds the {slot} slot with "
                         f"image states ({source}); use a text pipeline (--pipeline text-only)")
    fingerprint = dataset.fingerprint_of(manifest.fingerprint_inputs)
    stored = manifest.rows - 1
    if fingerprint != manifest.dataset_fingerprint and stored < len(dataset.items.ids) and \
            dataset.prefix_fingerprint(manifest.fingerprint_inputs, stored) == manifest.dataset_fingerprint:
        # A store written before items were appended to the items file: its items are the file's first ones.
        wanted = split.item_ids if item_ids is None else item_ids
        absent = [i for i in wanted if dataset.items.position[i] >= stored]
        if absent:
            raise IisanError(f"{path}: {len(absent):,} of the items needed ({', '.join(absent[:3])}"
                             f"{', ...' if len(absent) > 3 else ''}) were appended to {dataset.items.path} after "
                             f"the store was written; extend it: iisan extract --model {manifest.model_ref()} "
                             f"--dataset {dataset.name}" + (f" --field {manifest.text_field}"
                                                            if manifest.text_field else ""))
        fingerprint = manifest.dataset_fingerprint
    rule = layer_rule(cfg, slot)
    # With `final`, only the last kept layer is read next to it (the loader reads at least one layer).
    layers = ([manifest.layers[-1]] if final else
              select_layers(rule, manifest.total_layers) if rule else manifest.layers)
    mode = standardize_mode(cfg.standardize, source.model, manifest)
    # Held in the cache's storage dtype (an fp16 cache takes half the memory of an fp32 copy); the item encoder
    # casts only the rows it gathers, which is exact. Standardised states are new values, so they are fp32.
    expect = CacheExpectation(dataset=dataset.name, dataset_fingerprint=fingerprint, model=name, layers=layers)
    wanted = split.item_ids if item_ids is None else item_ids
    if statistics is None and mode != "off" and item_ids is not None:
        raise ValueError("standardised states for other items need the run's statistics")
    in_training = torch.from_numpy(split.train_counts > 0) if statistics is None and mode != "off" else None
    if cfg.cache_mode == "mmap":
        states, statistics = mapped_slot_states(path, expect, wanted, final, mode, statistics, in_training, cfg.progress)
    else:
        loaded = load_cache(path, expect, item_ids=wanted, dtype=torch.float32 if mode != "off" else None,
                            progress=cfg.progress, final=final)
        states = loaded.final[:, None, :] if final else loaded.states
        if mode != "off":
            if statistics is None:
                statistics = standardization(states, in_training, per=mode)
            states = standardized(states, statistics)
    return SlotStates(slot, source, path, manifest, [] if final else layers, states.to(device), mode,
                      # no rule given: the cache's own (a store extracted with remove_first trains as one)
                      init_from_first=not final and (rule or manifest.layer_selection).strip() == "remove_first",
                      statistics=statistics if mode != "off" else None)


MMAP_CHUNK = 65_536  # rows per step when a memory-mapped copy is standardised


def mapped_slot_states(path: Path, expect: CacheExpectation, item_ids: list[str], final: bool, mode: str,
                       statistics: tuple[torch.Tensor, torch.Tensor] | None, in_training: torch.Tensor | None,
                       progress: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`--cache-mode mmap`: the slot's states [N + 1, K, D] over a memory-mapped .npy file in
    `<store>.mmap/` (the storage dtype; made once per store, layers and item order, and reused), and, when
    standardised, over a second fp32 one of the standardised values, written chunk by chunk with statistics
    accumulated chunk by chunk (`streamed_standardization`). Nothing of the size of the cache is held in the
    process's own memory."""
    import hashlib
    import json
    import sys

    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    with open_cache(path) as store:
        manifest = store.manifest
    key = {"store": path.name, "dataset_fingerprint": expect.dataset_fingerprint, "model": expect.model,
           "layers": list(expect.layers or []), "final": final, "rows": manifest.rows,
           "dtype": manifest.storage_dtype, "items": digest(list(item_ids))}
    folder = path.parent / f"{path.name}.mmap"
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    loaded = mapped_states(path, folder / f"{digest(key)}.npy", key, expect, log=log, item_ids=item_ids,
                           progress=progress, final=final)
    states = loaded.final[:, None, :] if final else loaded.states
    if mode == "off":
        return states, None
    if statistics is None:
        statistics = streamed_standardization(states, in_training, mode)
    target = folder / f"{digest(key)}-{mode}-{digest([t.numpy().tobytes().hex() for t in statistics])}.npy"
    if not target.is_file():
        tmp = target.with_name(target.name + ".tmp")
        out = torch.from_numpy(np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=tuple(states.shape)))
        for a in range(0, len(states), MMAP_CHUNK):
            out[a:a + MMAP_CHUNK] = (states[a:a + MMAP_CHUNK].float() - statistics[0]) / statistics[1]
        out[0] = 0
        del out
        tmp.replace(target)
    return torch.from_numpy(np.lib.format.open_memmap(target, mode="r+")), statistics


def streamed_standardization(states: torch.Tensor, in_training: torch.Tensor, per: str = "dim"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`standardization`'s (mean, std) accumulated over chunks of rows in float64 (for states that are not in
    memory): equal to it up to float rounding (tests/test_scale.py)."""
    k, d = states.shape[1:]
    n, total, squares = 0, torch.zeros(k, d, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64)
    for a in range(0, len(states), MMAP_CHUNK):
        rows = states[a:a + MMAP_CHUNK][in_training[a:a + MMAP_CHUNK]].double()
        n += len(rows)
        total += rows.sum(dim=0)
        squares += (rows * rows).sum(dim=0)
    if per == "layer":
        count = n * d
        mean = total.sum(dim=1) / count
        var = (squares.sum(dim=1) - count * mean * mean) / (count - 1)
        mean, var = mean[:, None].expand(-1, d), var[:, None].expand(-1, d)
    elif per == "dim":
        mean = total / n
        var = (squares - n * mean * mean) / (n - 1)
    else:
        raise ValueError(f"standardize per '{per}': dim or layer")
    return mean.float().contiguous(), var.clamp(min=0).sqrt().float().clamp(min=1e-6).contiguous()


def standardize_mode(choice: str, model: str, manifest: Manifest) -> str:
    """off | dim | layer for one cache: `auto` standardises decoder-LLM caches only."""
    if choice == "auto":
        return DECODER_STANDARDIZE if _is_decoder(model, manifest) else "off"
    return "dim" if choice == "on" else choice


def _is_decoder(model: str, manifest: Manifest) -> bool:
    """Whether a cache holds decoder-LLM states: the family its ref resolves to (a registered name, or the
    model's own config, for the tower the store holds), else, where the model is no longer at hand, whether it
    was pooled at the last token."""
    from iisan.extract.models import spec_for

    try:
        return spec_for(model, kind="text" if manifest.text_field else "image").family == "decoder"
    except Exception:
        return manifest.pooling == "last"


def standardization(states: torch.Tensor, in_training: torch.Tensor, per: str = "dim"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the items seen in training, each [K, D] (broadcastable to states [N + 1, K, D]).
    `per="dim"`: one mean and std per (layer, dimension); `per="layer"`: one per layer over all its
    dimensions (near-constant dimensions of LLM states are then not blown up to unit variance)."""
    rows = states[in_training]
    if per == "layer":
        flat = rows.transpose(0, 1).reshape(rows.shape[1], -1)               # [K, items * D]
        mean, std = flat.mean(dim=1)[:, None], flat.std(dim=1).clamp(min=1e-6)[:, None]
        return mean.expand(-1, rows.shape[2]).contiguous(), std.expand(-1, rows.shape[2]).contiguous()
    if per == "dim":
        return rows.mean(dim=0), rows.std(dim=0).clamp(min=1e-6)
    raise ValueError(f"standardize per '{per}': dim or layer")


def standardized(states: torch.Tensor, statistics: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(x - mean) / std; row 0 (padding) stays 0."""
    mean, std = statistics
    out = (states - mean) / std
    out[0] = 0
    return out


def train_batches(split: SplitData, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Users shuffled each epoch, no drop_last: ids [b, L + 1] (left-padded train sequences)."""
    train = torch.from_numpy(split.train)
    order = torch.randperm(len(train), generator=generator)
    for start in range(0, len(order), batch_size):
        yield train[order[start:start + batch_size]]

