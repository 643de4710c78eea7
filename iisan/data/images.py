"""Item images: `<item_id>.jpg|jpeg|png` in one or more folders, searched in order, or a path per item in an
items-file column (dataset.yaml `image_field`).

Finding an image only lists folders (cheap); opening one decodes it and reports a corrupt file as a problem
instead of raising, so that extraction never crashes mid-way on a bad image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from iisan.errors import DataError

if TYPE_CHECKING:
    from iisan.data.readers import ItemTable
    from iisan.data.report import DataReport

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MISSING_IMAGE_FILE = "an image path to a file that does not exist"


def has_image_files(folders: tuple[Path, ...] | list[Path]) -> bool:
    """Whether any of the folders holds an image file (stops at the first one)."""
    for folder in folders:
        with os.scandir(folder) as entries:
            if any(os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file() for e in entries):
                return True
    return False


@dataclass
class ImageIndex:
    """Maps item id -> image path, the first folder holding `<item_id>.<suffix>` winning."""

    folders: tuple[Path, ...]
    paths: dict[str, Path]

    @classmethod
    def build(cls, folders: tuple[Path, ...] | list[Path]) -> "ImageIndex":
        paths: dict[str, Path] = {}
        for folder in folders:
            found: dict[str, Path] = {}
            with os.scandir(folder) as entries:
                for entry in entries:
                    stem, suffix = os.path.splitext(entry.name)
                    if suffix.lower() in IMAGE_SUFFIXES and entry.is_file():
                        # Within one folder prefer .jpg over .jpeg over .png, whatever the listing order.
                        previous = found.get(stem)
                        if previous is None or _rank(entry.name) < _rank(previous.name):
                            found[stem] = Path(entry.path)
            for stem, path in found.items():
                paths.setdefault(stem, path)
        return cls(tuple(folders), paths)

    @classmethod
    def from_field(cls, folder: Path, items: "ItemTable", image_field: str, report: "DataReport",
                   fallback: "ImageIndex") -> "ImageIndex":
        """Images named by an items-file column (paths relative to the dataset folder), then `fallback`'s
        folders for items the column leaves empty. A path that leaves the dataset folder is an error; one to
        a missing file is counted and the item takes the missing-image path."""
        root = folder.resolve()
        paths: dict[str, Path] = {}
        for item_id, value, line in zip(items.ids, items.fields[image_field], items.lines):
            value = value.strip()
            if not value:
                continue
            path = (root / value).resolve()
            if not path.is_relative_to(root):
                raise DataError(items.path, f"image path {value!r} (column {image_field}) leads outside the dataset "
                                            f"folder {root}", line)
            if path.is_file():
                paths[item_id] = path
            else:
                report.add(items.path, line, MISSING_IMAGE_FILE, "the item takes the missing-image path",
                           f"'{item_id}': {value}")
        for item_id, path in fallback.paths.items():
            paths.setdefault(item_id, path)
        return cls(fallback.folders, paths)

    def get(self, item_id: str) -> Path | None:
        return self.paths.get(item_id)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.paths


def _rank(name: str) -> int:
    return IMAGE_SUFFIXES.index(os.path.splitext(name)[1].lower())


def open_image(path: Path | None) -> tuple[Image.Image | None, str | None]:
    """Decode an image as RGB. Returns (image, None), or (None, why) for a missing or corrupt file."""
    if path is None:
        return None, "no image file"
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB"), None
    except FileNotFoundError:
        return None, f"{path}: file not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return None, f"{path}: corrupt image ({e.__class__.__name__}: {e})"


PLACEHOLDER_RGB = (128, 128, 128)  # mid-grey: what a missing or unreadable image is encoded as


def load_item_images(index: ImageIndex, item_ids: list[str],
                     placeholder_size: tuple[int, int] = (224, 224)) -> tuple[list[Image.Image], list[bool], list[str]]:
    """The images of a batch of items, in order. A missing or corrupt image becomes a mid-grey placeholder,
    its `missing` flag is set, and the reason is returned; a batch never fails on one bad file."""
    images: list[Image.Image] = []
    missing: list[bool] = []
    problems: list[str] = []
    for item_id in item_ids:
        image, why = open_image(index.get(item_id))
        if image is None:
            image = Image.new("RGB", placeholder_size, PLACEHOLDER_RGB)
            problems.append(f"item '{item_id}': {why}")
        images.append(image)
        missing.append(why is not None)
    return images, missing, problems
