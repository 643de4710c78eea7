"""Reading a cache: check it is the one asked for, load the needed layers into memory once, gather rows.

zarr decodes whole chunks on every access, so gathering random rows from the store per batch costs
~100 ms; loaded into RAM (or GPU memory) first, the same gather is a ~1 ms index operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from iisan.cache_store.backends import Backend, backend_for
from iisan.cache_store.manifest import CacheError, Manifest


@dataclass(frozen=True)
class CacheExpectation:
    """What the caller needs the cache to be; None means "any"."""

    dataset: str | None = None
    dataset_fingerprint: str | None = None
    model: str | None = None
    pooling: str | None = None
    layers: Sequence[int] | None = None  # hidden-state indices needed (a subset of those kept)


def check_expectation(manifest: Manifest, expect: CacheExpectation, where: str) -> None:
    problems = []
    for key in ("dataset", "model", "pooling"):
        want = getattr(expect, key)
        if want is not None and getattr(manifest, key) != want:
            problems.append(f"{key} is '{getattr(manifest, key)}', expected '{want}'")
    if expect.dataset_fingerprint is not None and manifest.dataset_fingerprint != expect.dataset_fingerprint:
        problems.append(f"dataset fingerprint is {manifest.dataset_fingerprint[:19]}…, the dataset now gives "
                        f"{expect.dataset_fingerprint[:19]}… (the items file or the encoded content changed)")
    if expect.layers is not None:
        lacking = [i for i in expect.layers if i not in manifest.layers]
        if lacking:
            problems.append(f"hidden states {lacking} are not kept (the cache keeps {manifest.layers}, "
                            f"requested {list(expect.layers)})")
    if problems:
        raise CacheError(f"{where}: cache does not match the request:\n  " + "\n  ".join(problems)
                         + f"\nre-extract it: iisan extract --model {manifest.model_ref()} "
                           f"--dataset {expect.dataset or manifest.dataset}")


@dataclass
class LoadedCache:
    """The requested layers in memory. `states[i]` is item index i's [k, D] stack; index 0 is zeros.
    `final[i]` (when asked for) is item index i's pooled last_hidden_state, after the model's final norm."""

    manifest: Manifest
    layers: list[int]          # hidden-state indices, in the order of states' second axis
    states: torch.Tensor       # [rows, k, D]
    missing: torch.Tensor      # [rows] bool
    item_ids: list[str]        # item id of each row ("" for row 0)
    final: torch.Tensor | None = None  # [rows, D], rows ordered like `states`; None unless load(final=True)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows for a tensor of item indices: shape index.shape + (k, D)."""
        return self.states[index.to(self.states.device)]


class CacheStore:
    """A store opened read-only."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.path = backend.path
        try:
            self.manifest = backend.manifest()
        except Exception:
            backend.close()
            raise

    def done_fraction(self) -> float:
        done = self.backend.read_done()
        return float(done.mean()) if len(done) else 1.0

    def final_source(self) -> str | int:
        """Where the model's final output (the pooled last_hidden_state) is read: "final" (the array) or the
        position, along `states`' second axis, of the last hidden state that equals it. Raises CacheError
        where the store cannot give it."""
        m = self.manifest
        if m.final_state == "stored":
            return "final"
        if m.final_state == "last_layer":
            last = m.total_layers - 1
            if last not in m.layers:
                raise CacheError(f"{self.path}: the model's final output is its last hidden state (index {last}), "
                                 f"which this store does not keep (it keeps {m.layers}); re-extract with a layer "
                                 f"selection that keeps it: iisan extract --model {m.model_ref()} --dataset "
                                 f"{m.dataset} --layers {','.join(map(str, sorted(set(m.layers) | {last})))} "
                                 f"--overwrite")
            return m.layers.index(last)
        raise CacheError(f"{self.path}: written before stores recorded the model's final output (the pooled "
                         f"last_hidden_state, after the final norm), which the frozen baseline reads; "
                         f"re-extract: iisan extract --model {m.model_ref()} --dataset {m.dataset} --overwrite")

    def load(self, layers: Sequence[int] | None = None, item_ids: Sequence[str] | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
             progress: bool = True, final: bool = False, into: Path | None = None) -> LoadedCache:
        """Load `layers` (hidden-state indices; default all kept) into memory once.

        With `item_ids` (the caller's items for index 1..N), rows are re-ordered so that index i holds
        item_ids[i - 1]; row 0 stays zeros. Reads one chunk at a time to keep peak memory near the result.
        With `final`, also the model's final output (`LoadedCache.final` [rows, D], ordered like `states`):
        the `final` array where the manifest says final_state "stored", the last hidden state where it says
        "last_layer"; a store written before final_state existed is refused (see `final_source`).
        With `into` (a path ending .npy), `states` (and `final`, in `into` with the suffix -final.npy) are
        written into memory-mapped .npy files there instead of memory, chunk by chunk, and returned mapped: the
        process's own memory does not grow with the store (see `mapped_states`).
        """
        m = self.manifest
        layers = list(m.layers if layers is None else layers)
        check_expectation(m, CacheExpectation(layers=layers), str(self.path))
        source = self.final_source() if final else None
        positions = [m.layers.index(i) for i in layers]
        stored_ids = self.backend.read_item_ids()
        missing = self.backend.read_missing()
        if item_ids is None:
            rows = np.arange(m.rows)
            out_ids = stored_ids
        else:
            row_of = {item: r for r, item in enumerate(stored_ids) if r > 0}
            absent = [item for item in item_ids if item not in row_of]
            if absent:
                raise CacheError(f"{self.path}: {len(absent):,} requested item(s) are not in the cache, e.g. "
                                 f"{', '.join(map(repr, absent[:5]))}; was it extracted from another items file?")
            rows = np.asarray([0] + [row_of[item] for item in item_ids], dtype=np.int64)
            out_ids = [""] + list(item_ids)
        target_dtype = dtype or (torch.float16 if m.storage_dtype == "float16" else torch.float32)
        if into is None:
            out = torch.empty((len(rows), len(layers), m.hidden_size), dtype=target_dtype)
            out_final = torch.empty((len(rows), m.hidden_size), dtype=target_dtype) if final else None
        else:
            out = _mapped(into, (len(rows), len(layers), m.hidden_size), target_dtype, "w+")
            out_final = _mapped(_final_path(into), (len(rows), m.hidden_size), target_dtype, "w+") if final else None
        # Map each store chunk to the output rows it feeds, then read chunks in order.
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        for chunk in tqdm(range(m.n_chunks), desc=f"loading {self.path.name}", unit="chunk", leave=False,
                          disable=not progress or m.n_chunks < 64):
            span = m.chunk_range(chunk)
            lo, hi = np.searchsorted(sorted_rows, [span.start, span.stop])
            if lo == hi:
                continue
            stored = self.backend.read_rows(span.start, span.stop)
            wanted = torch.from_numpy(order[lo:hi])
            picked = sorted_rows[lo:hi] - span.start
            out[wanted] = torch.from_numpy(np.ascontiguousarray(stored[picked][:, positions, :])).to(target_dtype)
            if final:
                block = self.backend.read_final_rows(span.start, span.stop) if source == "final" \
                    else stored[:, source, :]
                out_final[wanted] = torch.from_numpy(np.ascontiguousarray(block[picked])).to(target_dtype)
        if into is not None:
            out[0] = 0
            if final:
                out_final[0] = 0
            return LoadedCache(m, layers, out, torch.from_numpy(missing[rows]), out_ids, out_final)
        return LoadedCache(m, layers, out.to(device), torch.from_numpy(missing[rows]).to(device), out_ids,
                           out_final.to(device) if final else None)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "CacheStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str | Path) -> CacheStore:
    path = Path(path)
    return CacheStore(backend_for(path).open(path))


def load_cache(path: str | Path, expect: CacheExpectation = CacheExpectation(),
               layers: Sequence[int] | None = None, item_ids: Sequence[str] | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               allow_incomplete: bool = False, progress: bool = True, final: bool = False,
               into: Path | None = None) -> LoadedCache:
    """Open, check against `expect`, and load. Refuses an incomplete store unless `allow_incomplete`. With
    `final`, also the model's final output (`LoadedCache.final`; see `CacheStore.load`)."""
    with open_cache(path) as store:
        check_expectation(store.manifest, expect, str(store.path))
        if final:
            store.final_source()  # refuse a store that cannot give it before anything else
        fraction = store.done_fraction()
        if fraction < 1.0 and not allow_incomplete:
            raise CacheError(f"{store.path}: cache is incomplete ({fraction:.1%} of chunks done); "
                             f"re-run the extraction to complete it: iisan extract --model "
                             f"{store.manifest.model_ref()} --dataset {store.manifest.dataset}")
        return store.load(layers if layers is not None else expect.layers, item_ids, device, dtype, progress,
                          final, into)


# madvise(2) advice (Linux): read the range ahead into the page cache, asynchronously. The kernel reads at most
# the device's readahead size (128 KiB by default) per call, so the range is advised in steps of that size.
MADV_WILLNEED = 3
READ_AHEAD_STEP = 128 * 1024


def read_ahead(tensor: torch.Tensor, share: float = 0.5) -> bool:
    """Ask the kernel to read a memory-mapped tensor's pages into the page cache ahead of use (madvise
    WILLNEED, asynchronous; the process's own memory does not grow), when they fit in `share` of the memory
    available now: the batches' random row gathers then find their rows in memory instead of each waiting on
    the disk (the page cache of a file mapped but not read for a while, e.g. during an evaluation, may have been
    reclaimed). Larger than that, the pages are left to be read on demand. False where nothing was asked (too
    large, not Linux, or madvise refused)."""
    import ctypes
    import mmap

    size = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu":  # (states moved to a GPU: nothing mapped to advise)
        return False
    try:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, StopIteration, ValueError):
        return False
    if size == 0 or size > share * available:
        return False
    start = tensor.data_ptr() - tensor.data_ptr() % mmap.PAGESIZE
    stop = tensor.data_ptr() + size
    for a in range(start, stop, READ_AHEAD_STEP):  # about 0.3 s per GiB of calls here; the reads run behind them
        if libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(min(READ_AHEAD_STEP, stop - a)), MADV_WILLNEED) != 0:
            return False
    return True


def _final_path(path: Path) -> Path:
    return path.with_name(path.stem + "-final.npy")


def _mapped(path: Path, shape: tuple[int, ...], dtype: torch.dtype | None, mode: str) -> torch.Tensor:
    """A tensor over a memory-mapped .npy file (created with `mode` "w+", opened with "r+")."""
    if mode == "w+":
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
        return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape))
    return torch.from_numpy(np.lib.format.open_memmap(path, mode="r+"))


def mapped_states(path: str | Path, into: Path, key: dict, expect: CacheExpectation = CacheExpectation(),
                  log=None, **load_args) -> LoadedCache:
    """`load_cache` into memory-mapped files at `into` (.npy), reused while `key` (what the caller loads: the
    store's fingerprint, layers, item order, dtype) is the same. Written as `into`.tmp and renamed, then the
    key is written beside it (`into` with .json): a file without its key, or a .tmp one, is what an interrupted
    run left, and is rebuilt."""
    import json

    into = Path(into)
    meta = into.with_suffix(".json")
    final = bool(load_args.get("final"))
    if meta.is_file() and into.is_file() and json.loads(meta.read_text()) == key and \
            (not final or _final_path(into).is_file()):
        with open_cache(path) as store:
            check_expectation(store.manifest, expect, str(store.path))
            missing = store.backend.read_missing()
            ids = store.backend.read_item_ids()
        states = _mapped(into, (), None, "r+")
        item_ids = load_args.get("item_ids")
        order = [""] + list(item_ids) if item_ids is not None else list(ids)
        row_of = {item: r for r, item in enumerate(ids)}
        return LoadedCache(store.manifest, list(expect.layers or store.manifest.layers), states,
                           torch.from_numpy(missing[[row_of.get(i, 0) for i in order]]), order,
                           _mapped(_final_path(into), (), None, "r+") if final else None)
    leftovers = [p for p in (into, meta, _final_path(into), into.with_name(into.name + ".tmp"),
                             _final_path(into.with_name(into.name + ".tmp"))) if p.exists()]
    if leftovers and log is not None:
        log(f"{into}: rebuilding the memory-mapped copy (" + ("left incomplete by an interrupted run" if not
            meta.is_file() else "made for another request") + ")")
    for p in leftovers:
        p.unlink()
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = into.with_name(into.name + ".tmp")
    loaded = load_cache(path, expect, into=tmp, **load_args)
    del loaded  # unmapped: the pages written are the file's
    tmp.replace(into)
    if final:
        _final_path(tmp).replace(_final_path(into))
    meta.write_text(json.dumps(key, indent=2))
    return mapped_states(path, into, key, expect, log, **load_args)
