"""Writing a cache: chunk-aligned, resumable, shardable over processes.

A writer owns whole chunks (rank r of W takes the chunks c with c % W == r). It writes a chunk's states,
missing flags and (where the manifest says final_state "stored") pooled final outputs, makes them durable,
then sets the chunk's `done` flag; re-running skips done chunks. Rank 0 alone creates the store; the other
ranks attach to it after it exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from iisan import __version__
from iisan.cache_store.backends import Backend, Hdf5Backend, backend_for, remove_store
from iisan.cache_store.manifest import CacheError, Manifest

# Manifest fields that must agree for a resumed run to continue an existing store.
RESUME_KEYS = ("format_version", "dataset", "dataset_fingerprint", "model", "model_source", "model_revision",
               "model_weights_sha256", "pooling", "layers", "total_layers", "hidden_size", "rows", "chunk_rows",
               "storage_dtype", "text_field", "quantization", "model_dtype", "preprocessing", "final_state")
# Compared only where both sides recorded one: a store written before the field existed, or a caller that
# does not hash the weights (ranks other than 0, which attach to the store rank 0 has checked), has "".
IF_RECORDED = ("model_weights_sha256",)


def store_path(root: str | Path, dataset: str, model: str, field: str | None = None, fmt: str = "zarr") -> Path:
    """`root/<dataset>/<model>.zarr`, or `<model>@<field>.zarr` for a text field other than the title."""
    if fmt not in ("zarr", "h5"):
        raise CacheError(f"unknown cache format '{fmt}' (zarr or h5)")
    name = model if field in (None, "title") else f"{model}@{field}"
    return Path(root) / dataset / f"{name}.{fmt}"


def find_store(root: str | Path, dataset: str, model: str, field: str | None = None) -> Path | None:
    """The existing store for (dataset, model[@field]) under `root`, zarr first, then HDF5; None if neither."""
    for fmt in ("zarr", "h5"):
        path = store_path(root, dataset, model, field, fmt)
        if path.exists():
            return path
    return None


def manifest_differences(have: Manifest, want: Manifest, keys: tuple[str, ...] = RESUME_KEYS) -> list[str]:
    have_d, want_d = have.to_dict(), want.to_dict()
    return [f"{k}: store has {have_d.get(k)!r}, this run has {want_d.get(k)!r}" for k in keys
            if have_d.get(k) != want_d.get(k) and not (k in IF_RECORDED and not (have_d.get(k) and want_d.get(k)))]


def _unrecorded_final_state() -> str:
    return ("final_state: store has '' (written before stores recorded the model's final output, the pooled "
            "last_hidden_state after the final norm), this run records it")


class CacheWriter:
    """Open with `CacheWriter.open(...)`; then for each chunk in `pending_chunks()`, encode the items at
    `item_positions(chunk)` and call `write_chunk(chunk, states, missing, final)`; finally `finalize()`."""

    def __init__(self, backend: Backend, manifest: Manifest, rank: int, world_size: int) -> None:
        self.backend = backend
        self.manifest = manifest
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def open(cls, path: str | Path, manifest: Manifest, item_ids: list[str], rank: int = 0, world_size: int = 1,
             overwrite: bool = False, probe_final_state: Callable[[], str] | None = None,
             prefix_fingerprint: Callable[[int], str] | None = None) -> "CacheWriter":
        """Create the store, or attach to an existing one written for the same thing (every RESUME_KEYS field
        and the item ids agree); refuses one written for something else, listing the differences.

        `probe_final_state`, where given, says the manifest's final_state ("stored" | "last_layer") instead
        of `manifest.final_state` and is called only when needed (it may load a model): when the store is
        created, or when an existing store has chunks left for this rank (the probe then confirms the store's
        value). A store with nothing left for this rank takes the store's value without calling it; a store
        written before final_state existed ("") is refused without calling it.
        """
        path = Path(path)
        kind = backend_for(path)
        if not 0 <= rank < world_size:
            raise CacheError(f"rank {rank} out of range for world size {world_size}")
        if world_size > 1 and kind is Hdf5Backend:
            raise CacheError(f"{path}: HDF5 stores take one writer; use a .zarr store for {world_size} processes")
        if len(item_ids) + 1 != manifest.rows:
            raise CacheError(f"{path}: manifest says {manifest.rows} rows but {len(item_ids)} items + row 0 given")
        if any(not item for item in item_ids):
            raise CacheError(f"{path}: an item id is empty (\"\" marks row 0, the padding row)")
        if len(set(item_ids)) != len(item_ids):
            raise CacheError(f"{path}: item ids repeat; the cache needs one row per distinct item")
        exists = path.exists()
        # Only rank 0 deletes or creates; other ranks attach after it (the caller holds a barrier).
        if rank == 0 and exists and overwrite:
            remove_store(path)
            exists = False
        if not manifest.package_version:
            manifest.package_version = __version__
        if not exists:
            if rank != 0:
                raise CacheError(f"{path}: store does not exist yet (rank 0 creates it before other ranks attach)")
            if probe_final_state is not None:
                manifest.final_state = probe_final_state()
                manifest.__post_init__()  # validates the probed value
            path.parent.mkdir(parents=True, exist_ok=True)
            return cls(kind.create(path, manifest, item_ids), manifest, rank, world_size)
        backend = kind.open(path, writable=True)
        try:
            have = backend.manifest()
            if prefix_fingerprint is not None:
                extended = _extension(backend, have, manifest, item_ids, prefix_fingerprint, rank, world_size)
                if extended is not None:
                    have = extended
            keys = RESUME_KEYS if probe_final_state is None else tuple(k for k in RESUME_KEYS if k != "final_state")
            differences = manifest_differences(have, manifest, keys)
            if not differences and backend.read_item_ids()[1:] != list(item_ids):
                differences.append("item_ids differ")
            if probe_final_state is not None:
                if not have.final_state:
                    differences.append(_unrecorded_final_state())
                elif not differences:
                    done = backend.read_done()
                    left = any(not done[c] for c in range(have.n_chunks) if c % world_size == rank)
                    manifest.final_state = probe_final_state() if left else have.final_state
                    manifest.__post_init__()
                    differences = manifest_differences(have, manifest, ("final_state",))
        except BaseException:
            backend.close()
            raise
        if differences:
            backend.close()
            raise CacheError(f"{path}: an existing store was written for something else and cannot be resumed:\n  "
                             + "\n  ".join(differences) + "\ndelete it, or re-run with overwrite "
                             "(`iisan extract --overwrite`), or choose another --out")
        return cls(backend, have, rank, world_size)

    def done(self) -> np.ndarray:
        return self.backend.read_done()

    def pending_chunks(self) -> list[int]:
        """Chunks owned by this rank that are not flagged done, in order."""
        done = self.done()
        return [c for c in range(self.manifest.n_chunks) if c % self.world_size == self.rank and not done[c]]

    def _first_row(self, chunk: int) -> int:
        """The first row this chunk's write covers: its first row, or after an extension the first new row
        (the older rows of a chunk that held the store's last rows are kept as they are)."""
        return max(self.manifest.chunk_range(chunk).start, self.manifest.first_new_row)

    def item_positions(self, chunk: int) -> range:
        """0-based positions in the items file of the items this chunk's write covers (row = position + 1)."""
        rows = self.manifest.chunk_range(chunk)
        return range(max(self._first_row(chunk), 1) - 1, rows.stop - 1)

    def _checked(self, chunk: int, name: str, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Shape, finiteness and the storage dtype (overflow included) of one array's rows of a chunk."""
        values = np.asarray(values)
        if values.shape != shape:
            raise CacheError(f"chunk {chunk}: {name} shape {values.shape}, expected {shape}")
        if not np.isfinite(values).all():
            positions = self.item_positions(chunk)
            raise CacheError(f"chunk {chunk}: {name} hold NaN or Inf (items at positions "
                             f"{positions.start}..{positions.stop - 1}); the encoder output is not usable")
        with np.errstate(over="ignore"):
            values = values.astype(self.manifest.storage_dtype)
        if not np.isfinite(values).all():
            raise CacheError(f"chunk {chunk}: {name} values overflow {self.manifest.storage_dtype}; "
                             f"store as float32 or standardise the encoder output")
        if self._first_row(chunk) == 0:  # row 0, the padding row
            values = np.concatenate([np.zeros((1,) + shape[1:], values.dtype), values])
        return values

    def write_chunk(self, chunk: int, states: np.ndarray, missing: np.ndarray | None = None,
                    final: np.ndarray | None = None) -> None:
        """`states` [len(item_positions(chunk)), K, D] in any float dtype; row 0 is added for chunk 0.

        `final` [len(item_positions(chunk)), D], the pooled last_hidden_state, is required where the manifest
        says final_state "stored" and refused otherwise; checked and stored like `states`."""
        if chunk % self.world_size != self.rank:
            raise CacheError(f"rank {self.rank} does not own chunk {chunk}")
        positions = self.item_positions(chunk)
        K, D = len(self.manifest.layers), self.manifest.hidden_size
        stored = self.manifest.final_state == "stored"
        if stored and final is None:
            raise CacheError(f"chunk {chunk}: the manifest says final_state 'stored': pass `final` "
                             f"[{len(positions)}, {D}], the pooled last_hidden_state")
        if not stored and final is not None:
            raise CacheError(f"chunk {chunk}: `final` given, but the manifest says final_state "
                             f"{self.manifest.final_state!r} (only a store with final_state 'stored' holds it)")
        states = self._checked(chunk, "states", states, (len(positions), K, D))
        if final is not None:
            final = self._checked(chunk, "final", final, (len(positions), D))
        missing = np.zeros(len(positions), bool) if missing is None else np.asarray(missing, dtype=bool)
        if missing.shape != (len(positions),):
            raise CacheError(f"chunk {chunk}: missing shape {missing.shape}, expected {(len(positions),)}")
        if self._first_row(chunk) == 0:
            missing = np.concatenate([[False], missing])
        self.backend.write_chunk(chunk, self._first_row(chunk), states, missing, final)

    def finalize(self, seconds: float = 0.0) -> bool:
        """Rank 0: add this run's encoding seconds and mark the store complete if every chunk is done.
        Returns whether it is complete."""
        complete = bool(self.done().all())
        if self.rank == 0 and (complete != self.manifest.complete or seconds > 0):
            self.manifest.complete = complete
            self.manifest.extraction_seconds = round(self.manifest.extraction_seconds + seconds, 3)
            self.backend.set_manifest(self.manifest)
        return complete

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def extends(have: Manifest, want: Manifest, stored_ids: list[str], item_ids: list[str],
            prefix_fingerprint: Callable[[int], str]) -> bool:
    """Whether a store (`have`, holding `stored_ids`) can be extended to `item_ids`: it is complete, written for
    the same encoder and settings, and its items, ids and content, are the first of `item_ids`."""
    old = have.rows - 1
    if not (old < len(item_ids) and have.complete):
        return False
    keys = tuple(k for k in RESUME_KEYS if k not in ("dataset_fingerprint", "rows", "final_state"))
    if manifest_differences(have, want, keys) or (want.final_state and want.final_state != have.final_state):
        return False
    return stored_ids == list(item_ids[:old]) and prefix_fingerprint(old) == have.dataset_fingerprint


def _extension(backend: Backend, have: Manifest, want: Manifest, item_ids: list[str],
               prefix_fingerprint: Callable[[int], str], rank: int, world_size: int) -> Manifest | None:
    """Extend a complete store whose items are a prefix of `item_ids` (ids and content: the store's fingerprint
    equals the fingerprint of the dataset's first items) and which was written for the same thing otherwise:
    grow it to every item, record the extension, and flag the chunks holding new rows not done. None where it
    is not such a store (the caller then compares as usual and refuses a mismatch)."""
    from datetime import datetime, timezone

    if rank != 0 or not extends(have, want, backend.read_item_ids()[1:], item_ids, prefix_fingerprint):
        return None
    grown = Manifest.from_dict({**have.to_dict(), "rows": len(item_ids) + 1,
                                "dataset_fingerprint": want.dataset_fingerprint, "complete": False,
                                "first_new_row": have.rows,
                                "extensions": list(have.extensions) + [{
                                    "from_rows": have.rows, "to_rows": len(item_ids) + 1,
                                    "previous_fingerprint": have.dataset_fingerprint,
                                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}]},
                               str(backend.path))
    backend.extend(grown, list(item_ids))
    # the chunk that held the old last rows now also holds new ones: not done until they are written
    last_old = (have.rows - 1) // have.chunk_rows
    if have.rows % have.chunk_rows and last_old < grown.n_chunks:
        backend._arrays()["done"][last_old] = False
    return grown
