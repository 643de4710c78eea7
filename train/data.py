"""Stage-2 data: the protocol splits and the cached states each modality slot reads, in memory.

Cached states are loaded once, re-ordered into the trainer's item index (row i = item index i, row 0 =
padding) through the cache's `item_ids`, optionally standardised per layer with statistics of the items
that occur in training. Batches are rows of the in-memory train array, shuffled each epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from iisan.cache_store import CacheExpectation, load_cache, open_cache, store_path
from iisan.cache_store.manifest import Manifest
from iisan.data.dataset import Dataset
from iisan.data.protocol import SplitData
from iisan.errors import IisanError
from iisan.extract.layers import select_layers
from iisan.train.config import TrainConfig


@dataclass
class SlotStates:
    slot: str                  # "txt" or "img"
    source: str                # MODEL or MODEL@FIELD
    path: Path
    manifest: Manifest
    layers: list[int]
    states: torch.Tensor       # [N + 1, K, D], the cache's storage dtype (fp32 when standardised)
    standardized: bool


def slot_sources(cfg: TrainConfig) -> dict[str, str]:
    slots = {"txt": cfg.text}
    if cfg.image:
        slots["img"] = cfg.image
    elif cfg.text2:
        slots["img"] = cfg.text2
    return slots


def _split_source(source: str) -> tuple[str, str | None]:
    model, _, text_field = source.partition("@")
    return model, (text_field or None)


def _find_store(cfg: TrainConfig, dataset: str, source: str) -> Path:
    model, text_field = _split_source(source)
    candidates = [store_path(cfg.cache, dataset, model, text_field, fmt) for fmt in ("zarr", "h5")]
    for path in candidates:
        if path.exists():
            return path
    extract = f"iisan extract --model {model} --dataset {dataset}" + (f" --field {text_field}" if text_field else "")
    raise IisanError(f"no cache for {source} on {dataset} at {candidates[0]}: run `{extract}` first "
                     f"(or pass --cache with the root it was written to)")


def load_slot(cfg: TrainConfig, dataset: Dataset, split: SplitData, slot: str, source: str,
              device: torch.device) -> SlotStates:
    path = _find_store(cfg, dataset.name, source)
    with open_cache(path) as store:
        manifest = store.manifest
    inputs = manifest.fingerprint_inputs or {}
    if inputs.get("images") and not dataset.images.paths:
        raise IisanError(f"dataset '{dataset.name}' has no images, but the pipeline feeds the {slot} slot with "
                         f"image states ({source}); use a text pipeline (--pipeline text-only)")
    fingerprint = dataset.fingerprint(inputs.get("fields", []), bool(inputs.get("images")), inputs.get("extra") or {})
    rule = cfg.layers_text if slot == "txt" else cfg.layers_image
    layers = select_layers(rule, manifest.total_layers) if rule else manifest.layers
    model, _ = _split_source(source)
    standardize = cfg.standardize == "on" or (cfg.standardize == "auto" and _is_decoder(model, manifest))
    # Held in the cache's storage dtype (an fp16 cache takes half the memory of an fp32 copy); the item encoder
    # casts only the rows it gathers, which is exact. Standardised states are new values, so they are fp32.
    loaded = load_cache(path, CacheExpectation(dataset=dataset.name, dataset_fingerprint=fingerprint, model=model,
                                               layers=layers), item_ids=split.item_ids,
                        dtype=torch.float32 if standardize else None, progress=cfg.progress)
    states = loaded.states
    if standardize:
        states = standardized(states, torch.from_numpy(split.train_counts > 0))
    return SlotStates(slot, source, path, manifest, layers, states.to(device), standardize)


def _is_decoder(model: str, manifest: Manifest) -> bool:
    from iisan.extract.models import model_spec

    try:
        return model_spec(model).family == "decoder"
    except Exception:
        return manifest.pooling == "last"


def standardized(states: torch.Tensor, in_training: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per layer and dimension, statistics from the items seen in training; row 0 stays 0."""
    rows = states[in_training]
    mean, std = rows.mean(dim=0), rows.std(dim=0).clamp(min=1e-6)
    out = (states - mean) / std
    out[0] = 0
    return out


def train_batches(split: SplitData, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Users shuffled each epoch, no drop_last: ids [b, L + 1] (left-padded train sequences)."""
    train = torch.from_numpy(split.train)
    order = torch.randperm(len(train), generator=generator)
    for start in range(0, len(order), batch_size):
        yield train[order[start:start + batch_size]]


def next_item_mask(ids: torch.Tensor) -> torch.Tensor:
    """[b, L]: position j predicts slot j + 1, a real pair when both slots hold items."""
    return (ids[:, :-1] != 0) & (ids[:, 1:] != 0)
