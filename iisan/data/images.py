"""Item images: `<item_id>.jpg|jpeg|png` in one or more folders, searched in order.

Finding an image only lists folders (cheap); opening one decodes it and reports a corrupt file as a problem
instead of raising, so that extraction never crashes mid-way on a bad image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
