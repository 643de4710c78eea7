"""The registry `pipelines.yaml`: datasets (and, in later stages, models and pipelines) by name.

Where the registry is: `$IISAN_PIPELINES` if set, else the `pipelines.yaml` at the repository root (or the
copy a wheel install puts under `<prefix>/share/iisan-versa/`).
Where dataset folders are: `$IISAN_DATA_DIR` (several folders separated by `os.pathsep`), then `./data`,
then `../shared/data` (both relative to the working directory and to the repository root).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from iisan.errors import DataError, RegistryError

REPO_ROOT = Path(__file__).resolve().parents[1]


def registry_path() -> Path:
    """$IISAN_PIPELINES, else the repository's pipelines.yaml (source checkout or editable install), else
    the copy a wheel installs under <prefix>/share/iisan-versa."""
    if os.environ.get("IISAN_PIPELINES"):
        return Path(os.environ["IISAN_PIPELINES"])
    in_repo = REPO_ROOT / "pipelines.yaml"
    installed = Path(sys.prefix) / "share" / "iisan-versa" / "pipelines.yaml"
    return in_repo if in_repo.is_file() or not installed.is_file() else installed


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry not found (set IISAN_PIPELINES to its location)") from None
    except yaml.YAMLError as e:
        raise RegistryError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a mapping at the top level")
    return data


def load_registry() -> dict[str, Any]:
    path = registry_path()
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _load(str(path), mtime)


def search_roots(env_var: str, folder: str) -> list[Path]:
    """Folders searched, in order, for something found by name: those in `$env_var` (separated by
    os.pathsep), then ./<folder> and ../shared/<folder>, relative to the working directory and to the
    repository root; each once."""
    roots: list[Path] = []
    env = os.environ.get(env_var)
    if env:
        roots += [Path(p) for p in env.split(os.pathsep) if p]
    roots += [Path.cwd() / folder, REPO_ROOT / folder, Path.cwd().parent / "shared" / folder,
              REPO_ROOT.parent / "shared" / folder]
    unique: list[Path] = []
    for root in roots:
        resolved = root.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def data_roots() -> list[Path]:
    """Folders searched, in order, for a dataset folder named after the dataset."""
    return search_roots("IISAN_DATA_DIR", "data")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


@dataclass(frozen=True)
class DatasetEntry:
    """One `datasets.<name>` entry of the registry, defaults filled in."""

    name: str
    dir: str = field(metadata={"help": "folder name looked up in the data roots"})
    items: tuple[str, ...] = field(default=("items.tsv",), metadata={"help": "items file candidates"})
    users: tuple[str, ...] = field(default=("users.tsv",), metadata={"help": "users file candidates"})
    fields: tuple[str, ...] = field(default=("title",), metadata={"help": "text columns after item_id"})
    images: tuple[str, ...] = field(default=("images",), metadata={"help": "image folders in the dataset"})
    extra_images: tuple[str, ...] = field(default=(), metadata={"help": "image folders in the data roots"})
    fetch: str | None = field(default=None, metadata={"help": "built-in fetcher that builds the folder"})
    pipeline: str = field(default="text-image", metadata={"help": "pipeline `iisan train` uses by default"})

    @classmethod
    def from_yaml(cls, name: str, raw: dict[str, Any] | None) -> "DatasetEntry":
        raw = dict(raw or {})
        known = {"dir", "items", "users", "fields", "images", "extra_images", "fetch", "pipeline"}
        unknown = set(raw) - known
        if unknown:
            raise RegistryError(f"{registry_path()}: dataset '{name}' has unknown keys {sorted(unknown)}; "
                                f"known keys are {sorted(known)}")
        kwargs: dict[str, Any] = {"name": name, "dir": str(raw.get("dir", name))}
        for key in ("items", "users", "fields", "images", "extra_images"):
            if key in raw:
                kwargs[key] = tuple(_as_list(raw[key]))
        if not kwargs.get("fields", ("title",)):
            raise RegistryError(f"{registry_path()}: dataset '{name}' must list at least one text field")
        for key in ("fetch", "pipeline"):
            if raw.get(key):
                kwargs[key] = str(raw[key])
        return cls(**kwargs)


def dataset_names() -> list[str]:
    return list((load_registry().get("datasets") or {}).keys())


def dataset_entry(name: str) -> DatasetEntry:
    datasets = load_registry().get("datasets") or {}
    if name not in datasets:
        raise RegistryError(f"unknown dataset '{name}'; registered in {registry_path()}: "
                            f"{', '.join(datasets) or 'none'}")
    return DatasetEntry.from_yaml(name, datasets[name])


@dataclass(frozen=True)
class DatasetLocation:
    """Where a dataset's files are on this machine."""

    entry: DatasetEntry
    folder: Path
    items_file: Path
    users_file: Path
    image_dirs: tuple[Path, ...]
    absent_image_dirs: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.entry.name


def _first_existing(folder: Path, candidates: tuple[str, ...], what: str) -> Path:
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    raise DataError(folder / candidates[0], f"{what} file not found (looked for {', '.join(candidates)} in {folder})")


def locate_dataset(name: str, folder: str | Path | None = None) -> DatasetLocation:
    """Find a registered dataset's folder (or use `folder`) and its files."""
    entry = dataset_entry(name)
    if folder is None:
        roots = data_roots()
        found = [root / entry.dir for root in roots if (root / entry.dir).is_dir()]
        if not found:
            hint = (f"; run `iisan data fetch {entry.fetch}`" if entry.fetch else
                    f"; put a folder '{entry.dir}' holding {entry.items[0]} and {entry.users[0]} (IISAN TSV "
                    f"format) in one of them, or set IISAN_DATA_DIR")
            raise DataError(entry.dir, "dataset folder not found in any data root ("
                            + ", ".join(str(r) for r in roots) + f"){hint}")
        folder = found[0]
    folder = Path(folder)
    items_file = _first_existing(folder, entry.items, "items")
    users_file = _first_existing(folder, entry.users, "users")
    image_dirs: list[Path] = []
    absent: list[str] = []
    for sub in entry.images:
        if (folder / sub).is_dir():
            image_dirs.append(folder / sub)
    for extra in entry.extra_images:
        hits = [root / extra for root in data_roots() if (root / extra).is_dir()]
        if hits:
            image_dirs.append(hits[0])
        else:
            absent.append(extra)
    return DatasetLocation(entry, folder, items_file, users_file, tuple(image_dirs), tuple(absent))
