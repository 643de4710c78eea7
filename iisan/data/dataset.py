"""A dataset (registered, or a folder) loaded from disk: items, users, images, and the problems found reading them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from iisan.data.images import ImageIndex, has_image_files
from iisan.data.protocol import ProtocolConfig, SplitData, apply_protocol
from iisan.data.readers import ItemTable, UserTable, read_items, read_users
from iisan.data.report import DataReport
from iisan.errors import DataError
from iisan.registry import DatasetLocation, locate_dataset


@dataclass
class Dataset:
    location: DatasetLocation
    items: ItemTable
    users: UserTable
    images: ImageIndex
    report: DataReport

    @property
    def name(self) -> str:
        return self.location.name

    def split(self, config: ProtocolConfig = ProtocolConfig()) -> SplitData:
        return apply_protocol(self.items, self.users, config)

    def field_texts(self, field: str) -> list[str]:
        if field not in self.items.fields:
            raise DataError(self.items.path, f"no text field '{field}'; {self.location.described_by} lists "
                                             f"{', '.join(self.items.fields)} for dataset '{self.name}'")
        return self.items.fields[field]

    def fingerprint(self, fields: Sequence[str] = (), images: bool = False,
                    extra: Mapping[str, str] | None = None) -> str:
        return content_fingerprint(self.items, fields, self.images if images else None, extra)

    def prefix_fingerprint(self, inputs: Mapping[str, Any] | None, n: int) -> str:
        """The fingerprint the dataset's first `n` items would have (a cache store written before items were
        appended to the items file has it)."""
        inputs = inputs or {}
        head = ItemTable(self.items.path, self.items.ids[:n], {k: v[:n] for k, v in self.items.fields.items()},
                         self.items.lines[:n])
        return content_fingerprint(head, inputs.get("fields", []), self.images if inputs.get("images") else None,
                                   inputs.get("extra") or {})

    def fingerprint_of(self, inputs: Mapping[str, Any] | None) -> str:
        """The fingerprint for a cache manifest's `fingerprint_inputs` (`fingerprint_inputs(...)` made them)."""
        inputs = inputs or {}
        return self.fingerprint(inputs.get("fields", []), bool(inputs.get("images")), inputs.get("extra") or {})


def fingerprint_inputs(fields: Sequence[str], images: bool, extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a fingerprint covers, as a cache manifest records it: the text fields, whether images, extra options."""
    return {"fields": list(fields), "images": bool(images), "extra": dict(extra or {})}


def content_fingerprint(items: ItemTable, fields: Sequence[str] = (), images: ImageIndex | None = None,
                        extra: Mapping[str, str] | None = None) -> str:
    """Hash of the item ids (in file order) and the content an encoder reads: the named text fields,
    and for images each item's image file name and size (decoding every image would cost seconds per
    check). `extra` holds content options, e.g. the text cleaning mode, that change what is encoded."""
    h = hashlib.sha256(b"iisan-dataset-fingerprint-v1\0")

    def put(text: str) -> None:
        data = text.encode("utf-8", errors="surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put("ids")
    for item_id in items.ids:
        put(item_id)
    for name in fields:
        if name not in items.fields:
            raise DataError(items.path, f"no text field '{name}' (fields: {', '.join(items.fields)})")
        put(f"field:{name}")
        for text in items.fields[name]:
            put(text)
    if images is not None:
        put("images")
        for item_id in items.ids:
            path = images.get(item_id)
            put(f"{path.name}:{path.stat().st_size}" if path is not None else "")
    for key in sorted(extra or {}):
        put(f"extra:{key}={extra[key]}")
    return "sha256:" + h.hexdigest()


def load_dataset(ref: str | Path, folder: str | Path | None = None, strict: bool = False) -> Dataset:
    """Read a dataset: a registered name (found in the data roots, or at `folder`) or a dataset folder given
    as a path. Problems are collected in `dataset.report` (raised with `strict`)."""
    location = locate_dataset(ref, folder)
    report = DataReport(strict=strict)
    items = read_items(location.items_file, location.entry.fields, report)
    users = read_users(location.users_file, items, report)
    images = ImageIndex.build(location.image_dirs)
    if location.entry.image_field:
        images = ImageIndex.from_field(location.folder, items, location.entry.image_field, report, images)
    return Dataset(location, items, users, images, report)


def default_pipeline(location: DatasetLocation) -> tuple[str, str]:
    """The pipeline `iisan train` uses when none is given, and why: the dataset's own `pipeline`, else the
    modalities it has (text-image with images, text-only without)."""
    if location.entry.pipeline:
        return location.entry.pipeline, f"set for dataset '{location.name}' in {location.described_by}"
    if location.entry.image_field or has_image_files(location.image_dirs):
        return "text-image", f"dataset '{location.name}' has images"
    return "text-only", f"dataset '{location.name}' has no images"


@dataclass(frozen=True)
class DatasetStats:
    users: int
    items: int
    interactions: int
    zero_popularity_items: int
    repeat_valid: int
    repeat_test: int
    items_with_image: int
    file_items: int
    file_users: int
    file_interactions: int
    file_items_with_image: int
    cold_items: int = 0     # items the cold-start protocol withheld from training (0 without it)
    cold_valid: int = 0     # users whose valid target never occurs in training
    cold_test: int = 0      # users whose test target never occurs in training


def dataset_stats(dataset: Dataset, config: ProtocolConfig = ProtocolConfig()) -> DatasetStats:
    split = dataset.split(config)
    repeat_valid, repeat_test = split.repeat_targets()
    return DatasetStats(
        users=split.n_users,
        items=split.n_items,
        interactions=split.n_interactions,
        zero_popularity_items=split.zero_popularity_items(),
        repeat_valid=repeat_valid,
        repeat_test=repeat_test,
        items_with_image=sum(1 for item in split.item_ids if item in dataset.images),
        file_items=len(dataset.items),
        file_users=len(dataset.users),
        file_interactions=sum(len(s) for s in dataset.users.sequences),
        file_items_with_image=sum(1 for item in dataset.items.ids if item in dataset.images),
        cold_items=len(split.cold_items),
        cold_valid=int((~split.warm_targets("valid")).sum()),
        cold_test=int((~split.warm_targets("test")).sum()),
    )


def corrupt_images(dataset: Dataset, config: ProtocolConfig = ProtocolConfig()) -> list[str]:
    """Decode the image of every item the protocol keeps; the problem of each one that cannot be read."""
    from iisan.data.images import open_image

    return [why for item in dataset.split(config).item_ids if item in dataset.images
            for _, why in [open_image(dataset.images.get(item))] if why]
