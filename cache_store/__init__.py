"""The layer cache: one store per (dataset, encoder) holding `[rows, K, D]` pooled hidden states.

Format version 1 (DESIGN.md "The cache"): arrays `states` [N_items + 1, K, D] (row 0 zeros), `item_ids`
[N_items + 1] (row 0 ""), `missing` [N_items + 1] bool, `done` [n_chunks] bool; the manifest in the store's
attributes. Zarr 3 directory stores (`.zarr`, default) or HDF5 files (`.h5`, single writer).
"""

from iisan.cache_store.manifest import FORMAT_VERSION, CacheError, Manifest
from iisan.cache_store.reader import CacheExpectation, LoadedCache, load_cache, open_cache
from iisan.cache_store.writer import CacheWriter, store_path

__all__ = ["FORMAT_VERSION", "CacheError", "Manifest", "CacheExpectation", "LoadedCache", "load_cache",
           "open_cache", "CacheWriter", "store_path"]
