"""Cache I/O benchmark: write, load and gather at a given size, zarr vs HDF5.

    python -m iisan.cache_store.bench [--items 20825] [--layers 7] [--hidden 384] [--batch 704]

The default size is Scientific's (20,825 items) with 7 kept layers of a 384-d encoder; `--batch 704` is the
number of slots of a 64-user batch (64 x 11). Random states stand in for encoder outputs: I/O does not
depend on the values.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iisan.cache_store import CacheWriter, Manifest, open_cache
from iisan.cache_store.inspect import human_bytes


def bench(fmt: str, items: int, layers: int, hidden: int, batch: int, root: Path) -> str:
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(items)]
    path = root / f"bench.{fmt}"
    manifest = Manifest(dataset="bench", dataset_fingerprint="-", model="bench", model_source="-", pooling="mean",
                        layers=list(range(layers)), total_layers=layers, hidden_size=hidden, rows=items + 1)
    start = time.perf_counter()
    with CacheWriter.open(path, manifest, ids) as writer:
        for chunk in writer.pending_chunks():
            n = len(writer.item_positions(chunk))
            writer.write_chunk(chunk, rng.standard_normal((n, layers, hidden), dtype=np.float32))
        writer.finalize()
    write_s = time.perf_counter() - start
    rows = np.sort(rng.choice(items, batch, replace=False)) + 1
    with open_cache(path) as store:
        start = time.perf_counter()
        loaded = store.load(dtype=torch.float32)
        load_s = time.perf_counter() - start
        states = store.backend.group["states"] if fmt == "zarr" else store.backend.file["states"]
        start = time.perf_counter()
        for _ in range(5):
            if fmt == "zarr":
                states.get_orthogonal_selection((rows, slice(None), slice(None)))
            else:
                states[rows.tolist()]
        from_store_ms = (time.perf_counter() - start) / 5 * 1e3
        size = store.backend.bytes_on_disk()
    index = torch.from_numpy(rows)
    start = time.perf_counter()
    for _ in range(100):
        loaded.gather(index)
    from_memory_ms = (time.perf_counter() - start) / 100 * 1e3
    return (f"{fmt:5s} write {write_s:5.2f} s ({items / write_s:,.0f} items/s)  load {load_s:4.2f} s  "
            f"gather {batch} rows: from the store {from_store_ms:6.1f} ms, from memory {from_memory_ms:5.2f} ms  "
            f"on disk {human_bytes(size)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20825)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--batch", type=int, default=704)
    args = parser.parse_args()
    print(f"cache I/O: {args.items:,} items x {args.layers} layers x {args.hidden} (fp16), torch threads "
          f"{torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("zarr", "h5"):
            print(bench(fmt, args.items, args.layers, args.hidden, args.batch, Path(tmp)))


if __name__ == "__main__":
    main()
