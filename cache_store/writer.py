"""Writing a cache: chunk-aligned, resumable, shardable over processes.

A writer owns whole chunks (rank r of W takes the chunks c with c % W == r). It writes a chunk's states
and missing flags, makes them durable, then sets the chunk's `done` flag; re-running skips done chunks.
Rank 0 alone creates the store; the other ranks attach to it after it exists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iisan import __version__
from iisan.cache_store.backends import Backend, Hdf5Backend, backend_for, remove_store
from iisan.cache_store.manifest import CacheError, Manifest

# Manifest fields that must agree for a resumed run to continue an existing store.
RESUME_KEYS = ("format_version", "dataset", "dataset_fingerprint", "model", "model_source", "model_revision",
               "pooling", "layers", "total_layers", "hidden_size", "rows", "chunk_rows", "storage_dtype",
               "text_field", "quantization", "model_dtype", "preprocessing")


def store_path(root: str | Path, dataset: str, model: str, field: str | None = None, fmt: str = "zarr") -> Path:
    """`root/<dataset>/<model>.zarr`, or `<model>@<field>.zarr` for a text field other than the title."""
    if fmt not in ("zarr", "h5"):
        raise CacheError(f"unknown cache format '{fmt}' (zarr or h5)")
    name = model if field in (None, "title") else f"{model}@{field}"
    return Path(root) / dataset / f"{name}.{fmt}"


def manifest_differences(have: Manifest, want: Manifest, keys: tuple[str, ...] = RESUME_KEYS) -> list[str]:
    have_d, want_d = have.to_dict(), want.to_dict()
    return [f"{k}: store has {have_d.get(k)!r}, this run has {want_d.get(k)!r}" for k in keys
            if have_d.get(k) != want_d.get(k)]


class CacheWriter:
    """Open with `CacheWriter.open(...)`; then for each chunk in `pending_chunks()`, encode the items at
    `item_positions(chunk)` and call `write_chunk(chunk, states, missing)`; finally `finalize()`."""

    def __init__(self, backend: Backend, manifest: Manifest, rank: int, world_size: int) -> None:
        self.backend = backend
        self.manifest = manifest
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def open(cls, path: str | Path, manifest: Manifest, item_ids: list[str], rank: int = 0, world_size: int = 1,
             overwrite: bool = False) -> "CacheWriter":
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
            path.parent.mkdir(parents=True, exist_ok=True)
            return cls(kind.create(path, manifest, item_ids), manifest, rank, world_size)
        backend = kind.open(path, writable=True)
        have = backend.manifest()
        differences = manifest_differences(have, manifest)
        if not differences and backend.read_item_ids()[1:] != list(item_ids):
            differences.append("item_ids differ")
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

    def item_positions(self, chunk: int) -> range:
        """0-based positions in the items file of the items stored in this chunk (row = position + 1)."""
        rows = self.manifest.chunk_range(chunk)
        return range(max(rows.start, 1) - 1, rows.stop - 1)

    def write_chunk(self, chunk: int, states: np.ndarray, missing: np.ndarray | None = None) -> None:
        """`states` [len(item_positions(chunk)), K, D] in any float dtype; row 0 is added for chunk 0."""
        if chunk % self.world_size != self.rank:
            raise CacheError(f"rank {self.rank} does not own chunk {chunk}")
        positions = self.item_positions(chunk)
        K, D = len(self.manifest.layers), self.manifest.hidden_size
        states = np.asarray(states)
        if states.shape != (len(positions), K, D):
            raise CacheError(f"chunk {chunk}: states shape {states.shape}, expected {(len(positions), K, D)}")
        if not np.isfinite(states).all():
            raise CacheError(f"chunk {chunk}: states hold NaN or Inf (items at positions "
                             f"{positions.start}..{positions.stop - 1}); the encoder output is not usable")
        with np.errstate(over="ignore"):
            states = states.astype(self.manifest.storage_dtype)
        if not np.isfinite(states).all():
            raise CacheError(f"chunk {chunk}: values overflow {self.manifest.storage_dtype}; "
                             f"store as float32 or standardise the encoder output")
        missing = np.zeros(len(positions), bool) if missing is None else np.asarray(missing, dtype=bool)
        if missing.shape != (len(positions),):
            raise CacheError(f"chunk {chunk}: missing shape {missing.shape}, expected {(len(positions),)}")
        if chunk == 0:
            states = np.concatenate([np.zeros((1, K, D), states.dtype), states])
            missing = np.concatenate([[False], missing])
        self.backend.write_chunk(chunk, self.manifest.chunk_range(chunk).start, states, missing)

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
