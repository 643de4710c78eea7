"""Writing the IISAN TSV layout: `items.tsv`, `users.tsv`, `dataset.yaml`, built in a staging folder.

Shared by the fetchers (`iisan data fetch`), the importers (`iisan data import`) and the image downloader
(`iisan data images`), so that every dataset folder the product writes has the same shape.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import yaml

from iisan.errors import DataError
from iisan.registry import DATASET_YAML
# dataset.yaml keys in the order they are written (others, if a user added any, follow in their own order).
YAML_KEYS = ("name", "items", "users", "fields", "images", "image_field", "image_url_field")


def clean_text(text: str) -> str:
    """One line of text for a TSV column: tabs and newlines become spaces, runs of whitespace one space."""
    return " ".join(text.replace("\t", " ").split())


def sort_user_ids(ids: Iterable[str]) -> list[str]:
    """Users in the order the layout writes them: by id, numerically when every id is a decimal number
    (MovieLens' 1..943), else as strings. The order is then the same whatever the source file's order."""
    ids = list(ids)
    if all(u.isascii() and u.isdigit() for u in ids):
        return sorted(ids, key=lambda u: (int(u), u))
    return sorted(ids)


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """Write text lines (UTF-8, `\\n`) through a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_file_stem(item_id: str) -> bool:
    """Whether an item id can name its image file `<item_id>.<suffix>` inside an images folder."""
    return item_id not in (".", "..") and not any(c in item_id for c in "/\\\0")


def _flow(value: Any) -> str:
    """A YAML scalar or a list in flow style, quoted only where YAML needs it."""
    if isinstance(value, (list, tuple)):
        return yaml.safe_dump(list(value), default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 30, allow_unicode=True).strip()[1:-1]


def render_dataset_yaml(meta: dict[str, Any], comment: str) -> str:
    """dataset.yaml text: the comment line(s), then one `key: value` line per key (lists in flow style)."""
    lines = [f"# {line}" if not line.startswith("#") else line for line in comment.splitlines()]
    keys = [k for k in YAML_KEYS if k in meta] + [k for k in meta if k not in YAML_KEYS]
    lines += [f"{key}: {_flow(meta[key])}" for key in keys if meta[key] not in (None, "", [], ())]
    return "\n".join(lines) + "\n"


def read_dataset_yaml(folder: Path) -> tuple[dict[str, Any], str]:
    """A folder's dataset.yaml as (mapping, its leading comment lines); ({}, "") when there is none."""
    path = folder / DATASET_YAML
    if not path.is_file():
        return {}, ""
    text = path.read_text(encoding="utf-8")
    try:
        meta = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise DataError(path, f"not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise DataError(path, "expected a mapping of keys")
    comment = "\n".join(line for line in _leading_comments(text.splitlines()))
    return meta, comment


def _leading_comments(lines: list[str]) -> Iterable[str]:
    for line in lines:
        if not line.startswith("#"):
            return
        yield line


def write_dataset_yaml(folder: Path, meta: dict[str, Any], comment: str) -> None:
    write_lines(folder / DATASET_YAML, render_dataset_yaml(meta, comment).splitlines())


class StagedFolder:
    """A dataset folder built under a temporary sibling name and renamed into place by `commit`, so that
    `out` is either absent, the old folder, or the whole new one; `discard` removes what was written.

    An existing non-empty `out` is refused unless `force` (then it is replaced at commit)."""

    def __init__(self, out: Path, force: bool):
        self.out = out
        self.force = force
        if out.exists() and not out.is_dir():
            raise DataError(out, "exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise DataError(out, "folder exists and is not empty (use --force to replace it)")
        self.path: Path | None = None

    def create(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)  # mkdtemp makes it private; the dataset folder is an ordinary one
        return self.path

    def commit(self) -> None:
        assert self.path is not None
        old = None
        if self.out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, old / self.out.name)
        os.replace(self.path, self.out)
        self.path = None
        if old is not None:
            shutil.rmtree(old)

    def discard(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
