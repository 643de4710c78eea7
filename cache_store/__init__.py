"""The layer cache: one store per (dataset, encoder) holding `[rows, K, D]` pooled hidden states.

Format version 1 (docs/design.md, "The cache"): arrays `states` [N_items + 1, K, D] (row 0 zeros), `item_ids`
[N_items + 1] (row 0 ""), `missing` [N_items + 1] bool, `done` [n_chunks] bool, and, where the manifest's
`final_state` is "stored", `final` [N_items + 1, D] (row 0 zeros; dtype and chunks as `states`): the pooled
`last_hidden_state`, i.e. the model's output after its final norm, which the frozen baseline reads. A model
without a separate final output has final_state "last_layer" (its last hidden state is that output); a store
written before the field existed has "" and loads its `states` as before, but not its final output.
The manifest lives in the store's attributes. Zarr 3 directory stores (`.zarr`, default) or HDF5 files
(`.h5`, single writer).
"""

from iisan.cache_store.manifest import FORMAT_VERSION, CacheError, Manifest
from iisan.cache_store.reader import CacheExpectation, LoadedCache, load_cache, mapped_states, open_cache
from iisan.cache_store.writer import CacheWriter, find_store, store_path

__all__ = ["FORMAT_VERSION", "CacheError", "Manifest", "CacheExpectation", "LoadedCache", "load_cache", "mapped_states",
           "open_cache", "CacheWriter", "find_store", "store_path"]
