"""The two on-disk formats behind one small interface.

zarr 3 (directory store, default): every array is chunked on whole items; `done` has one element per chunk
in its own chunk file, so each writer touches only the chunks it owns (an attribute updated by several
writers loses updates). zarr's local store writes each chunk file atomically (temp file + rename), and the
writer fsyncs a chunk's data files (`states`, `missing` and, where the manifest says final_state "stored",
`final`) before it sets the chunk's flag.

HDF5 (`.h5`, h5py): one writer at a time. The writer flushes after a chunk's data and again after its flag.
A SIGKILL between chunks leaves a readable file that resumes (tested); HDF5 itself cannot make its flush
atomic, so a kill in the middle of a flush may leave the file unreadable: `cache_store verify` then
reports it, and the store must be extracted again. Use zarr where extraction may be interrupted often.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from iisan.cache_store.manifest import CacheError, Manifest

MANIFEST_KEY = "iisan"


def backend_for(path: Path) -> type["Backend"]:
    suffix = path.suffix.lower()
    if suffix == ".zarr":
        return ZarrBackend
    if suffix in (".h5", ".hdf5"):
        return Hdf5Backend
    raise CacheError(f"{path}: unknown cache format '{suffix}' (use .zarr or .h5)")


class Backend:
    path: Path

    @classmethod
    def create(cls, path: Path, manifest: Manifest, item_ids: list[str]) -> "Backend":
        raise NotImplementedError

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "Backend":
        raise NotImplementedError

    def manifest(self) -> Manifest:
        raw = self._raw_manifest()
        if raw is None:
            raise CacheError(f"{self.path}: no IISAN manifest (not a cache store written by iisan)")
        return Manifest.from_dict(raw, str(self.path))

    def _final_expected(self) -> bool:
        """Whether the manifest says final_state "stored" (False where the manifest cannot be read: that is
        reported by `manifest()`)."""
        try:
            raw = self._raw_manifest()
        except CacheError:
            return False
        return isinstance(raw, dict) and raw.get("final_state") == "stored"

    def extend(self, manifest: Manifest, item_ids: list[str]) -> None:
        """Grow every array to `manifest.rows` rows (and its chunk count), the item ids to `item_ids` (row 0 is
        padding); existing rows are not touched. The new chunks start not done."""
        raise NotImplementedError

    # Implemented per format ------------------------------------------------------------------------
    def _raw_manifest(self) -> dict | None: ...
    def set_manifest(self, manifest: Manifest) -> None: ...
    def shape(self) -> tuple[int, ...]: ...
    def dtype(self) -> np.dtype: ...
    def read_done(self) -> np.ndarray: ...
    def array_dtypes(self) -> dict[str, str]: ...
    def chunk_file_present(self, chunk: int) -> bool: ...
    def read_missing(self) -> np.ndarray: ...
    def read_item_ids(self) -> list[str]: ...
    def read_rows(self, start: int, stop: int) -> np.ndarray: ...

    def _arrays(self):
        """The zarr group or HDF5 file holding the arrays (both index them by name)."""
        raise NotImplementedError

    def has_final(self) -> bool:
        return "final" in self._arrays()

    def final_shape(self) -> tuple[int, ...]:
        return tuple(self._arrays()["final"].shape)

    def final_dtype(self) -> np.dtype:
        return np.dtype(self._arrays()["final"].dtype)

    def read_final_rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._arrays()["final"][start:stop])

    def write_chunk(self, chunk: int, start: int, states: np.ndarray, missing: np.ndarray,
                    final: np.ndarray | None = None) -> None: ...
    def close(self) -> None: ...

    def bytes_on_disk(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


def remove_store(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _temporary_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # left by a creation that was killed
        remove_store(stale)
    return path.with_name(f".{path.name}.creating-{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ZarrBackend(Backend):
    def __init__(self, path: Path, group) -> None:
        self.path = path
        self.group = group
        self.stores_final = False  # the manifest says final_state "stored" (set by open)

    @classmethod
    def create(cls, path: Path, manifest: Manifest, item_ids: list[str]) -> "ZarrBackend":
        import zarr

        # Built under a temporary name and renamed into place: a store that exists is whole.
        tmp = _temporary_sibling(path)
        group = zarr.open_group(str(tmp), mode="w")
        K, D, C = len(manifest.layers), manifest.hidden_size, manifest.chunk_rows
        # write_empty_chunks: every chunk flagged done has its file, even an all-zero one, so verify can
        # tell a lost chunk file from data.
        always = {"write_empty_chunks": True}
        group.create_array("states", shape=(manifest.rows, K, D), chunks=(C, K, D), dtype=manifest.storage_dtype,
                           fill_value=0, compressors=None, config=always)
        if manifest.final_state == "stored":  # the pooled last_hidden_state, chunked like `states`
            group.create_array("final", shape=(manifest.rows, D), chunks=(C, D), dtype=manifest.storage_dtype,
                               fill_value=0, compressors=None, config=always)
        group.create_array("missing", shape=(manifest.rows,), chunks=(C,), dtype="bool", fill_value=False,
                           compressors=None, config=always)
        group.create_array("done", shape=(manifest.n_chunks,), chunks=(1,), dtype="bool", fill_value=False,
                           compressors=None)
        ids = group.create_array("item_ids", shape=(manifest.rows,), chunks=(manifest.rows,), dtype=str)
        ids[:] = np.asarray([""] + list(item_ids), dtype=object)
        group.attrs[MANIFEST_KEY] = manifest.to_dict()
        os.rename(tmp, path)
        return cls.open(path, writable=True)

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "ZarrBackend":
        import zarr

        if not path.is_dir():
            raise CacheError(f"{path}: cache store not found")
        try:
            group = zarr.open_group(str(path), mode="r+" if writable else "r")
            for name in ("states", "missing", "done", "item_ids"):
                if name not in group:
                    raise CacheError(f"{path}: array '{name}' missing")
                group[name]  # parse each array's metadata now, not halfway through a read
            backend = cls(path, group)
            backend.stores_final = backend._final_expected()
            if backend.stores_final:
                if "final" not in group:
                    raise CacheError(f"{path}: array 'final' missing (the manifest says final_state 'stored')")
                group["final"]
        except CacheError:
            raise
        except Exception as e:  # zarr raises several types for damaged metadata
            raise CacheError(f"{path}: not a readable zarr store ({e.__class__.__name__}: {e})") from None
        return backend

    def _chunk_file(self, name: str, chunk: int) -> Path:
        array = self.group[name]
        key = (chunk,) + (0,) * (len(array.shape) - 1)
        return self.path / array.path / array.metadata.encode_chunk_key(key)

    def _data_arrays(self) -> tuple[str, ...]:
        return ("states", "final", "missing") if self.stores_final else ("states", "missing")

    def chunk_file_present(self, chunk: int) -> bool:
        """Whether the chunk's `states` file (and `final` file, where the manifest says it is stored) exists."""
        return all(self._chunk_file(name, chunk).is_file() for name in self._data_arrays() if name != "missing")

    def _raw_manifest(self) -> dict | None:
        raw = self.group.attrs.get(MANIFEST_KEY)
        return dict(raw) if raw is not None else None

    def set_manifest(self, manifest: Manifest) -> None:
        self.group.attrs[MANIFEST_KEY] = manifest.to_dict()

    def shape(self) -> tuple[int, ...]:
        return tuple(self.group["states"].shape)

    def dtype(self) -> np.dtype:
        return np.dtype(self.group["states"].dtype)

    def array_dtypes(self) -> dict[str, str]:
        return {name: str(self.group[name].dtype) for name in ("missing", "done")}

    def read_done(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def read_missing(self) -> np.ndarray:
        return np.asarray(self.group["missing"][:], dtype=bool)

    def read_item_ids(self) -> list[str]:
        return [str(x) for x in self.group["item_ids"][:]]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.group["states"][start:stop])

    def _arrays(self):
        return self.group

    def extend(self, manifest: Manifest, item_ids: list[str]) -> None:
        rows = manifest.rows
        for name in ("states", "final", "missing"):
            if name in self.group:
                array = self.group[name]
                array.resize((rows,) + tuple(array.shape[1:]))
        self.group["done"].resize((manifest.n_chunks,))
        # one chunk of ids, rewritten whole (the ids are small next to the states)
        del self.group["item_ids"]
        ids = self.group.create_array("item_ids", shape=(rows,), chunks=(rows,), dtype=str)
        ids[:] = np.asarray([""] + list(item_ids), dtype=object)
        self.set_manifest(manifest)

    def write_chunk(self, chunk: int, start: int, states: np.ndarray, missing: np.ndarray,
                    final: np.ndarray | None = None) -> None:
        stop = start + len(states)
        self.group["states"][start:stop] = states
        if final is not None:
            self.group["final"][start:stop] = final
        self.group["missing"][start:stop] = missing
        # The flag means "this chunk's data is durable": sync the data files before setting it.
        for name in self._data_arrays():
            chunk_file = self._chunk_file(name, chunk)
            if chunk_file.is_file():
                _fsync(chunk_file)
        self.group["done"][chunk] = True

    def close(self) -> None:
        pass


class Hdf5Backend(Backend):
    def __init__(self, path: Path, file) -> None:
        self.path = path
        self.file = file

    @classmethod
    def create(cls, path: Path, manifest: Manifest, item_ids: list[str]) -> "Hdf5Backend":
        import h5py

        tmp = _temporary_sibling(path)
        f = cls._h5open(tmp, "w")
        K, D, C = len(manifest.layers), manifest.hidden_size, manifest.chunk_rows
        # Resizable along the rows (maxshape None), so that the store can be extended with appended items.
        f.create_dataset("states", shape=(manifest.rows, K, D), chunks=(min(C, manifest.rows), K, D),
                         maxshape=(None, K, D), dtype=manifest.storage_dtype, fillvalue=0)
        if manifest.final_state == "stored":  # the pooled last_hidden_state, chunked like `states`
            f.create_dataset("final", shape=(manifest.rows, D), chunks=(min(C, manifest.rows), D),
                             maxshape=(None, D), dtype=manifest.storage_dtype, fillvalue=0)
        f.create_dataset("missing", shape=(manifest.rows,), maxshape=(None,), dtype=bool, fillvalue=False)
        f.create_dataset("done", shape=(manifest.n_chunks,), maxshape=(None,), dtype=bool, fillvalue=False)
        f.create_dataset("item_ids", data=np.asarray([""] + list(item_ids), dtype=object), maxshape=(None,),
                         dtype=h5py.string_dtype("utf-8"))
        f.attrs[MANIFEST_KEY] = json.dumps(manifest.to_dict())
        f.close()
        os.rename(tmp, path)
        return cls.open(path, writable=True)

    @staticmethod
    def _h5open(path: Path, mode: str):
        import h5py

        try:
            return h5py.File(path, mode)
        except OSError as e:
            text = str(e).lower()
            if "unable to lock file" in text or "already open for write" in text:
                raise CacheError(f"{path}: HDF5 store is open by another writer (HDF5 takes one writer; "
                                 f"use a .zarr store for sharded extraction)") from None
            raise CacheError(f"{path}: not a readable HDF5 file ({e}); if an extraction was killed while "
                             f"HDF5 was flushing, delete the file and extract again") from None

    @classmethod
    def open(cls, path: Path, writable: bool = False) -> "Hdf5Backend":
        if not path.is_file():
            raise CacheError(f"{path}: cache store not found")
        f = cls._h5open(path, "r+" if writable else "r")
        for name in ("states", "missing", "done", "item_ids"):
            if name not in f:
                f.close()
                raise CacheError(f"{path}: dataset '{name}' missing")
        backend = cls(path, f)
        if backend._final_expected() and "final" not in f:
            f.close()
            raise CacheError(f"{path}: dataset 'final' missing (the manifest says final_state 'stored')")
        return backend

    def _raw_manifest(self) -> dict | None:
        raw = self.file.attrs.get(MANIFEST_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise CacheError(f"{self.path}: manifest is not valid JSON ({e})") from None

    def set_manifest(self, manifest: Manifest) -> None:
        self.file.attrs[MANIFEST_KEY] = json.dumps(manifest.to_dict())
        self.file.flush()

    def shape(self) -> tuple[int, ...]:
        return tuple(self.file["states"].shape)

    def dtype(self) -> np.dtype:
        return np.dtype(self.file["states"].dtype)

    def array_dtypes(self) -> dict[str, str]:
        return {name: str(self.file[name].dtype) for name in ("missing", "done")}

    def chunk_file_present(self, chunk: int) -> bool:
        return True  # one file: a lost chunk cannot happen apart from the file itself

    def read_done(self) -> np.ndarray:
        return np.asarray(self.file["done"][:], dtype=bool)

    def read_missing(self) -> np.ndarray:
        return np.asarray(self.file["missing"][:], dtype=bool)

    def read_item_ids(self) -> list[str]:
        return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in self.file["item_ids"][:]]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.file["states"][start:stop])

    def _arrays(self):
        return self.file

    def extend(self, manifest: Manifest, item_ids: list[str]) -> None:
        fixed = [name for name in ("states", "final", "missing", "done", "item_ids")
                 if name in self.file and self.file[name].maxshape[0] is not None]
        if fixed:
            raise CacheError(f"{self.path}: this HDF5 store was written before stores could grow ({', '.join(fixed)} "
                             f"cannot be resized); extract it again (--overwrite) or use a .zarr store")
        for name in ("states", "final", "missing"):
            if name in self.file:
                self.file[name].resize(manifest.rows, axis=0)
        self.file["done"].resize(manifest.n_chunks, axis=0)
        self.file["item_ids"].resize(manifest.rows, axis=0)
        self.file["item_ids"][:] = np.asarray([""] + list(item_ids), dtype=object)
        self.set_manifest(manifest)

    def write_chunk(self, chunk: int, start: int, states: np.ndarray, missing: np.ndarray,
                    final: np.ndarray | None = None) -> None:
        stop = start + len(states)
        self.file["states"][start:stop] = states
        if final is not None:
            self.file["final"][start:stop] = final
        self.file["missing"][start:stop] = missing
        self.file.flush()
        self.file["done"][chunk] = True
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
