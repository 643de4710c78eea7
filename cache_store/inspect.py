"""`cache_store stats` and `cache_store verify`: what is cached, how big, how complete, and is it sound.

"on disk" counts every file of a store (the `final` array included); verify checks `states` and, where the
manifest says final_state "stored", `final` (shape, dtype, NaN / Inf, row 0 zeros)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from iisan.cache_store.backends import backend_for
from iisan.cache_store.manifest import CacheError, Manifest
from iisan.cache_store.reader import CacheStore, open_cache

STORE_SUFFIXES = (".zarr", ".h5", ".hdf5")


def default_cache_root() -> Path:
    return Path(os.environ.get("IISAN_CACHE_DIR", "cache"))


def find_stores(paths: list[Path]) -> list[Path]:
    """Stores named directly, or found (recursively) inside the folders named."""
    found: list[Path] = []
    for path in paths:
        if path.suffix.lower() in STORE_SUFFIXES and path.exists():
            found.append(path)
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                for name in sorted(dirs):
                    if name.lower().endswith(".zarr"):
                        found.append(Path(root) / name)
                dirs[:] = sorted(d for d in dirs if not d.lower().endswith(".zarr"))
                found += [Path(root) / f for f in sorted(files) if f.lower().endswith((".h5", ".hdf5"))]
        else:
            raise CacheError(f"{path}: no cache store or folder here")
    return found


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class StoreStats:
    path: Path
    dataset: str
    model: str
    rows: int
    layers_kept: int
    layers_total: int
    hidden_size: int
    dtype: str
    bytes_on_disk: int
    bytes_all_layers: int
    complete_percent: float


def store_stats(path: Path) -> StoreStats:
    with open_cache(path) as store:
        m = store.manifest
        itemsize = np.dtype(m.storage_dtype).itemsize
        return StoreStats(path, m.dataset, m.model + (f"@{m.text_field}" if m.text_field not in (None, "title") else ""),
                          m.rows, len(m.layers), m.total_layers, m.hidden_size, m.storage_dtype,
                          store.backend.bytes_on_disk(), m.rows * m.total_layers * m.hidden_size * itemsize,
                          100.0 * store.done_fraction())


def format_stats(rows: list[StoreStats]) -> str:
    header = ("dataset", "model", "rows", "layers", "hidden", "dtype", "on disk", "all layers", "complete", "path")
    table = [header] + [(s.dataset, s.model, f"{s.rows:,}", f"{s.layers_kept}/{s.layers_total}", str(s.hidden_size),
                         s.dtype, human_bytes(s.bytes_on_disk), human_bytes(s.bytes_all_layers),
                         f"{s.complete_percent:.1f}%", str(s.path)) for s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def verify_store(path: Path, data_dir: Path | None = None, check_fingerprint: bool = True) -> list[str]:
    """Every problem found, as messages; an empty list means the store is sound. Never raises on a damaged
    store: whatever cannot be read is itself reported."""
    try:
        store: CacheStore = CacheStore(backend_for(path).open(path))
    except CacheError as e:
        return [str(e)]
    except Exception as e:  # damaged metadata of any kind
        return [f"unreadable store ({e.__class__.__name__}: {e})"]
    problems: list[str] = []
    with store:
        try:
            problems += _check_structure(store)
            if not problems:
                problems += _scan_values(store)
        except Exception as e:
            problems.append(f"unreadable data ({e.__class__.__name__}: {e})")
        if check_fingerprint:
            try:
                problems += _check_fingerprint(store, store.backend.read_item_ids(), data_dir)
            except Exception as e:
                problems.append(f"cannot check the dataset fingerprint ({e.__class__.__name__}: {e})")
    return problems


def _check_structure(store: CacheStore) -> list[str]:
    m, b, problems = store.manifest, store.backend, []
    expected_shape = (m.rows, len(m.layers), m.hidden_size)
    if b.shape() != expected_shape:
        problems.append(f"states shape {b.shape()}, manifest implies {expected_shape}")
    if b.dtype() != np.dtype(m.storage_dtype):
        problems.append(f"states dtype {b.dtype()}, manifest says {m.storage_dtype}")
    if m.final_state == "stored":  # opening checked the array is there
        if b.final_shape() != (m.rows, m.hidden_size):
            problems.append(f"final shape {b.final_shape()}, manifest implies {(m.rows, m.hidden_size)}")
        if b.final_dtype() != np.dtype(m.storage_dtype):
            problems.append(f"final dtype {b.final_dtype()}, manifest says {m.storage_dtype}")
    elif b.has_final():
        problems.append(f"a `final` array is present, but the manifest says final_state {m.final_state!r} "
                        f"(only 'stored' has one)")
    for name, dtype in b.array_dtypes().items():
        if dtype != "bool":
            problems.append(f"{name} dtype {dtype}, expected bool")
    item_ids = b.read_item_ids()
    if len(item_ids) != m.rows:
        problems.append(f"item_ids has {len(item_ids)} rows, states has {m.rows}")
    elif item_ids[0] != "" or any(not i for i in item_ids[1:]):
        problems.append("item_ids: row 0 must be empty and every other row an id")
    elif len(set(item_ids)) != len(item_ids):
        problems.append("item_ids repeat")
    missing, done = b.read_missing(), b.read_done()
    if len(missing) != m.rows:
        problems.append(f"missing has {len(missing)} rows, states has {m.rows}")
    elif missing[0]:
        problems.append("row 0 (padding) is flagged missing")
    if len(done) != m.n_chunks:
        problems.append(f"done has {len(done)} flags for {m.n_chunks} chunks")
        return problems
    lost = [c for c in range(m.n_chunks) if done[c] and not b.chunk_file_present(c)]
    if lost:
        problems.append(f"{len(lost)} chunk(s) flagged done have no data file (first: {lost[:5]}); "
                        f"re-extract the store")
    if not done.all():
        problems.append(f"incomplete: {int(done.sum())} of {len(done)} chunks done "
                        f"(re-run `iisan extract --model {m.model_ref()} --dataset {m.dataset}` to complete it)")
    elif not m.complete:
        problems.append("every chunk is done but the manifest is not marked complete (the writer did not "
                        "finalize; re-run the extraction to finalize)")
    return problems


def _scan_values(store: CacheStore) -> list[str]:
    """NaN / Inf and a non-zero row 0 in `states`, and in `final` where the manifest says it is stored."""
    m = store.manifest
    problems = _scan_array(m, store.backend.read_rows, "")
    if m.final_state == "stored":
        problems += _scan_array(m, store.backend.read_final_rows, "final: ")
    return problems


def _scan_array(m: Manifest, read, label: str) -> list[str]:
    problems: list[str] = []
    bad_rows = 0
    first_bad: list[int] = []
    for chunk in range(m.n_chunks):
        span = m.chunk_range(chunk)
        try:
            block = read(span.start, span.stop).astype(np.float32)
        except Exception as e:
            problems.append(f"{label}chunk {chunk} (rows {span.start}..{span.stop - 1}) is unreadable "
                            f"({e.__class__.__name__}: {e})")
            continue
        if chunk == 0 and np.any(block[0] != 0):
            problems.append(f"{label}row 0 (padding) is not all zeros")
        bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if bad.any():
            bad_rows += int(bad.sum())
            first_bad += [span.start + int(r) for r in np.flatnonzero(bad)[:5 - len(first_bad)]]
    if bad_rows:
        problems.append(f"{label}{bad_rows:,} row(s) hold NaN or Inf (first rows {first_bad})")
    return problems


def _check_fingerprint(store: CacheStore, item_ids: list[str], data_dir: Path | None) -> list[str]:
    from iisan.data.dataset import load_dataset  # verify alone needs the data layer

    m = store.manifest
    try:
        dataset = load_dataset(m.dataset, folder=data_dir)
    except Exception as e:  # registry or data problems: report them as the reason the check could not run
        return [f"cannot check the dataset fingerprint: {e} (pass --data-dir, or --skip-fingerprint)"]
    try:
        now = dataset.fingerprint_of(m.fingerprint_inputs)
    except Exception as e:
        return [f"cannot recompute the dataset fingerprint: {e}"]
    problems = []
    if now != m.dataset_fingerprint:
        problems.append(f"dataset fingerprint {m.dataset_fingerprint[:19]}… does not match the dataset at "
                        f"{dataset.location.folder} ({now[:19]}…): the items or their content changed")
    if item_ids[1:] != dataset.items.ids:
        problems.append(f"item_ids differ from {dataset.items.path} ({len(item_ids) - 1:,} rows vs "
                        f"{len(dataset.items):,} items)")
    return problems
