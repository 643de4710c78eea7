"""The registry `pipelines.yaml`: datasets, models and pipelines by name; and datasets given as a folder.

Where the registry is: `$IISAN_PIPELINES` if set, else the `pipelines.yaml` at the repository root (or the
copy a wheel install puts under `share/iisan-versa/` of its target, prefix or user base).
Where dataset folders are: `$IISAN_DATA_DIR` (several folders separated by `os.pathsep`), then `./data`,
then `../shared/data` (both relative to the working directory and to the repository root).

A dataset is a name or a path (`is_dataset_path`): a folder in the IISAN TSV layout needs no registry entry.
Its settings come from the registry entry of the same name, if any, then from the folder's own
`dataset.yaml` (the keys of a registry entry, plus `name`), then from the files themselves (the columns after
the item id are `title`, `field2`, ...; `images/` if present).
"""

from __future__ import annotations

import dataclasses
import os
import site
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict

from iisan.errors import DataError, DatasetNotFound, RegistryError
from iisan.yamlfile import Where, field_name, read_yaml, validated

REPO_ROOT = Path(__file__).resolve().parents[1]


def installed_file(relative: str) -> Path:
    """A file or folder the package ships beside its code: the repository's own (source checkout, editable
    install), else the copy a wheel install puts under `share/iisan-versa/` of its scheme's data folder:
    `<target>/share/...` for `pip install --target`, `<prefix>/share/...` for a venv or system install,
    `<user base>/share/...` for `--user`. The first that exists; the repository's path if none does (an error
    then names it)."""
    in_repo = REPO_ROOT / relative
    candidates = [in_repo] + [base / "share" / "iisan-versa" / relative
                              for base in (REPO_ROOT, Path(sys.prefix), Path(site.getuserbase()))]
    return next((c for c in candidates if c.exists()), in_repo)


def registry_path() -> Path:
    """$IISAN_PIPELINES, else the shipped pipelines.yaml (`installed_file`)."""
    if os.environ.get("IISAN_PIPELINES"):
        return Path(os.environ["IISAN_PIPELINES"])
    return installed_file("pipelines.yaml")


class LayersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    image: str | None = None


class PipelineFile(BaseModel):
    """A `pipelines.<name>` entry: its slots' sources and layer rules; any other key is an `iisan train` option
    (checked against the training config when the pipeline is resolved, naming this line)."""
    model_config = ConfigDict(extra="allow")
    text: str | None = None
    image: str | None = None
    text2: str | None = None
    layers: LayersFile | None = None


class RegistryFile(BaseModel):
    """pipelines.yaml: its three sections (a dataset's and a model's keys are checked where the entry is read:
    DatasetFile, extract/models.py's ModelFile)."""
    model_config = ConfigDict(extra="forbid")
    datasets: dict[str, dict[str, Any] | None] | None = None
    models: dict[str, dict[str, Any] | None] | None = None
    pipelines: dict[str, PipelineFile | None] | None = None


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> tuple[dict[str, Any], Where]:
    if not Path(path).is_file():
        raise RegistryError(f"{path}: registry not found (set IISAN_PIPELINES to its location)")
    data, where = read_yaml(path, RegistryError)
    if not isinstance(data if data is not None else {}, dict):
        raise RegistryError(f"{where.at()}: expected a mapping at the top level")
    validated(RegistryFile, data, where, RegistryError)
    return data or {}, where


def load_registry() -> dict[str, Any]:
    """The registry with the tuned presets (presets.yaml) among its pipelines."""
    path, presets = registry_path(), presets_path()
    return _merged(str(path), _mtime(path), str(presets), _mtime(presets))


def _mtime(path: Path) -> float:
    """A file's modification time (0 when absent): what the cached loaders are keyed on, so an edit is seen."""
    return path.stat().st_mtime if path.exists() else 0.0


def _presets() -> tuple[dict[str, "PresetFile"], Where]:
    path = presets_path()
    return _load_presets(str(path), _mtime(path))


@lru_cache(maxsize=8)
def _merged(path: str, mtime: float, presets: str, presets_mtime: float) -> dict[str, Any]:
    registry = dict(_load(path, mtime)[0])
    pipelines = dict(registry.get("pipelines") or {})
    found, where = _load_presets(presets, presets_mtime)
    for name, preset in found.items():
        if name in pipelines:
            raise RegistryError(f"{where.at('presets', name)}: presets.{name}: a pipeline of {path} has this name; "
                                f"rename the preset")
        pipelines[name] = dict(preset.values)
    registry["pipelines"] = pipelines
    return registry


PRESETS_HEADER = """\
# Tuned presets: pipelines that `iisan tune --save-preset NAME` wrote (each `iisan train --pipeline NAME`), kept
# apart from the wiring in pipelines.yaml. This file is written by the tuner; an entry is
#   NAME: {note: where it was tuned, values: {text: MODEL, method: ..., any `iisan train` option: value}}
"""


class PresetFile(BaseModel):
    """One tuned preset: a note (where and how it was tuned) and its pipeline's values."""
    model_config = ConfigDict(extra="forbid")
    note: str = ""
    values: dict[str, Any]


class PresetsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    presets: dict[str, PresetFile] = {}


def presets_path() -> Path:
    """$IISAN_PRESETS, else presets.yaml beside the registry in use."""
    if os.environ.get("IISAN_PRESETS"):
        return Path(os.environ["IISAN_PRESETS"])
    return registry_path().with_name("presets.yaml")


@lru_cache(maxsize=8)
def _load_presets(path: str, mtime: float) -> tuple[dict[str, PresetFile], Where]:
    if not Path(path).is_file():
        return {}, Where(Path(path), None)
    data, where = read_yaml(path, RegistryError)
    return validated(PresetsFile, data, where, RegistryError).presets, where


def preset_note(name: str) -> str | None:
    """The note of a tuned preset; None when NAME is not one (a pipeline of pipelines.yaml, or unknown)."""
    found = _presets()[0]
    return found[name].note if name in found else None


def pipeline_where(name: str) -> str:
    """FILE:LINE of a pipeline's entry, in presets.yaml for a tuned preset, else in the registry."""
    found, where = _presets()
    return where.at("presets", name, "values") if name in found else registry_where().at("pipelines", name)


def save_preset(name: str, values: dict[str, Any], note: str) -> Path:
    """Write (or replace) a tuned preset in presets.yaml with a YAML library (the file's other presets kept); a
    name that a pipeline of the registry has is refused."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise RegistryError(f"preset '{name}': use letters, digits, - and _")
    if name in (_registry()[0].get("pipelines") or {}):
        raise RegistryError(f"preset '{name}': {registry_path()} has a pipeline of that name; choose another")
    path = presets_path()
    current = _presets()[0]
    entries = {k: v.model_dump() for k, v in current.items()}
    entries[name] = PresetFile(note=note, values=dict(values)).model_dump()
    text = PRESETS_HEADER + yaml.safe_dump({"presets": entries}, sort_keys=False, allow_unicode=True, width=110)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def registry_where() -> Where:
    """The registry file's lines (for errors naming the line of an entry's field)."""
    return _registry()[1]


def _registry() -> tuple[dict[str, Any], Where]:
    path = registry_path()
    return _load(str(path), _mtime(path))


def search_roots(env_var: str, folder: str) -> list[Path]:
    """Folders searched, in order, for something found by name: those in `$env_var` (separated by
    os.pathsep), then ./<folder> and ../shared/<folder>, relative to the working directory and to the
    repository root; each once."""
    roots: list[Path] = []
    env = os.environ.get(env_var)
    if env:
        roots += [Path(p) for p in env.split(os.pathsep) if p]
    roots += [Path.cwd() / folder, REPO_ROOT / folder, *shared_roots(folder)]
    unique: list[Path] = []
    for root in roots:
        resolved = root.resolve()
        if resolved not in unique:
            unique.append(resolved)
    return unique


def shared_roots(folder: str) -> list[Path]:
    """../shared/<folder> beside the working directory and beside the repository (read-only material a
    development machine may have; never required)."""
    return [Path.cwd().parent / "shared" / folder, REPO_ROOT.parent / "shared" / folder]


def data_roots() -> list[Path]:
    """Folders searched, in order, for a dataset folder named after the dataset."""
    return search_roots("IISAN_DATA_DIR", "data")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


DATASET_YAML = "dataset.yaml"


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Names = Annotated[list[str], BeforeValidator(_one_or_many)]  # a list of names, or one name


class DatasetFile(BaseModel):
    """The keys of a `datasets.<name>` registry entry and of a folder's dataset.yaml (which may also give
    `name`); a list key may be one string."""
    model_config = ConfigDict(extra="forbid")
    dir: str | None = None
    items: Names | None = None
    users: Names | None = None
    fields: Names | None = None
    images: Names | None = None
    extra_images: Names | None = None
    image_field: str | None = None
    image_url_field: str | None = None
    fetch: str | None = None
    pipeline: str | None = None


class DatasetYamlFile(DatasetFile):
    name: str | None = None


@dataclass(frozen=True)
class DatasetEntry:
    """One `datasets.<name>` entry of the registry (or a folder's dataset.yaml), defaults filled in."""

    name: str
    dir: str = field(metadata={"help": "folder name looked up in the data roots"})
    items: tuple[str, ...] = field(default=("items.tsv",), metadata={"help": "items file candidates"})
    users: tuple[str, ...] = field(default=("users.tsv",), metadata={"help": "users file candidates"})
    fields: tuple[str, ...] = field(default=("title",), metadata={"help": "text columns after item_id"})
    images: tuple[str, ...] = field(default=("images",), metadata={"help": "image folders in the dataset"})
    extra_images: tuple[str, ...] = field(default=(), metadata={"help": "image folders in the data roots"})
    image_field: str = field(default="", metadata={"help": "column holding each item's image path"})
    image_url_field: str = field(default="", metadata={"help": "column holding each item's image URL"})
    fetch: str | None = field(default=None, metadata={"help": "built-in fetcher that builds the folder"})
    pipeline: str = field(default="", metadata={
        "help": "pipeline `iisan train` uses by default (none: text-image if the dataset has images, else "
                "text-only)"})


    @classmethod
    def from_yaml(cls, name: str, raw: dict[str, Any] | None, lines: Where | None = None,
                  base: "DatasetEntry | None" = None) -> "DatasetEntry":
        """An entry from its YAML mapping (checked by DatasetFile; `lines`: where it sits, for the errors); keys
        it does not give come from `base` (else the defaults)."""
        lines = lines or registry_where().inside("datasets", name)
        validated(DatasetFile, raw, lines, RegistryError)
        raw = dict(raw or {})
        kwargs: dict[str, Any] = dataclasses.asdict(base) if base is not None else {}
        kwargs.update(name=name, dir=str(raw.get("dir", kwargs.get("dir", name))))
        for key in ("items", "users", "fields", "images", "extra_images"):
            if key in raw:
                kwargs[key] = tuple(_as_list(raw[key]))
        if not kwargs.get("fields", ("title",)):
            raise RegistryError(f"{lines.at('fields')}: {field_name((*lines.prefix, 'fields'))}: must list at least one "
                                f"text field")
        for key in ("image_field", "image_url_field", "fetch", "pipeline"):
            if raw.get(key):
                kwargs[key] = str(raw[key])
        entry = cls(**kwargs)
        for key in ("image_field", "image_url_field"):
            value = getattr(entry, key)
            if value and value not in entry.fields:
                raise RegistryError(f"{lines.at(key)}: {field_name((*lines.prefix, key))}: '{value}' is not one of the "
                                    f"fields ({', '.join(entry.fields)})")
        return entry


def dataset_names() -> list[str]:
    return list((load_registry().get("datasets") or {}).keys())


def dataset_entry(name: str) -> DatasetEntry:
    datasets = load_registry().get("datasets") or {}
    if name not in datasets:
        raise RegistryError(f"unknown dataset '{name}'; registered in {registry_path()}: "
                            f"{', '.join(datasets) or 'none'}; or give the dataset's folder as a path "
                            f"(e.g. --dataset ./data/{name})")
    return DatasetEntry.from_yaml(name, datasets[name])


def is_dataset_path(ref: str | Path) -> bool:
    """A dataset given as a folder: a value containing a path separator, or naming an existing directory."""
    text = str(ref)
    return "/" in text or os.sep in text or Path(text).expanduser().is_dir()


def dataset_name(ref: str | Path) -> str:
    """The name a dataset reference stands for: the name itself, or a folder's dataset.yaml `name` / folder
    name. Caches and runs are filed under it."""
    if not is_dataset_path(ref):
        return str(ref)
    folder = Path(ref).expanduser()
    return str(_read_dataset_yaml(folder).get("name") or folder.resolve().name)


def _read_dataset_yaml(folder: Path) -> dict[str, Any]:
    return _dataset_yaml(folder)[0]


def _dataset_yaml(folder: Path) -> tuple[dict[str, Any], Where | None]:
    """A folder's dataset.yaml, checked (DatasetYamlFile), and its lines; ({}, None) when there is none."""
    path = folder / DATASET_YAML
    if not path.is_file():
        return {}, None
    data, where = read_yaml(path, RegistryError)
    validated(DatasetYamlFile, data, where, RegistryError)
    return dict(data or {}), where


def _sniffed_fields(items_file: Path, sample: int = 1000) -> tuple[str, ...]:
    """Column names for an items file without a description: `title`, `field2`, ... for the widest of its
    first lines (a line holding only the id is an item without text)."""
    width = 1
    try:
        with open(items_file, "rb") as f:
            for number, raw in enumerate(f):
                if number >= sample:
                    break
                width = max(width, raw.rstrip(b"\r\n").count(b"\t") + 1)
    except OSError as e:
        raise DataError(items_file, f"cannot read: {e}") from None
    return ("title",) + tuple(f"field{k}" for k in range(2, width))


@dataclass(frozen=True)
class DatasetLocation:
    """Where a dataset's files are on this machine."""

    entry: DatasetEntry
    folder: Path
    items_file: Path
    users_file: Path
    image_dirs: tuple[Path, ...]
    absent_image_dirs: tuple[str, ...]
    described_by: str = "the registry"   # where the settings came from, for messages

    @property
    def name(self) -> str:
        return self.entry.name


def _first_existing(folder: Path, candidates: tuple[str, ...], what: str) -> Path:
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    raise DataError(folder / candidates[0], f"{what} file not found (looked for {', '.join(candidates)} in {folder})")


def _entry_for_folder(folder: Path) -> tuple[DatasetEntry, str]:
    """A folder's settings: registry entry of its name < its dataset.yaml < what the files show."""
    if not folder.is_dir():
        raise DataError(folder, "dataset folder not found" if not folder.exists() else "not a folder")
    described, lines = _dataset_yaml(folder)
    name = str(described.pop("name", "") or folder.resolve().name)
    registered = name in (load_registry().get("datasets") or {})
    base = dataset_entry(name) if registered else None
    entry = DatasetEntry.from_yaml(name, described, lines or Where(folder / DATASET_YAML, None), base=base)
    sources = ([f"the registry entry '{name}'"] if registered else []) + ([DATASET_YAML] if described else [])
    if not registered and "fields" not in described:
        items_file = _first_existing(folder, entry.items, "items")
        entry = dataclasses.replace(entry, fields=_sniffed_fields(items_file))
        sources.append("the items file's columns")
    return entry, " and ".join(sources)


def locate_dataset(ref: str | Path, folder: str | Path | None = None) -> DatasetLocation:
    """Find a dataset's files: a registered name (its folder in the data roots, or `folder`), a dataset
    folder given as a path (`is_dataset_path`), or any name with its `folder`."""
    registered = str(ref) in (load_registry().get("datasets") or {})
    if folder is None and is_dataset_path(ref):
        folder = Path(ref).expanduser().resolve()
        entry, described = _entry_for_folder(folder)
    elif folder is not None and not registered:  # e.g. a cache's dataset name and the folder it came from
        entry, described = _entry_for_folder(Path(folder))
    else:
        entry, described = dataset_entry(str(ref)), "the registry"
    if folder is None:
        roots = data_roots()
        found = [root / entry.dir for root in roots if (root / entry.dir).is_dir()]
        if not found:
            hint = (f"; run `iisan data fetch {entry.fetch}`" if entry.fetch else
                    f"; put a folder '{entry.dir}' holding {entry.items[0]} and {entry.users[0]} (IISAN TSV "
                    f"format) in one of them, or set IISAN_DATA_DIR")
            raise DatasetNotFound(entry.dir, "dataset folder not found in any data root ("
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
    return DatasetLocation(entry, folder, items_file, users_file, tuple(image_dirs), tuple(absent), described)
