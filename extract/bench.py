"""Extraction throughput against the bare forward pass, in one process.

    python -m iisan.extract.bench --model minilm-l6 --dataset scientific [--limit 4096] [--device auto]

Runs the first `--limit` items through (a) `model(**inputs, output_hidden_states=True)` alone, on inputs
prepared beforehand, and (b) the real extraction path (tokenize or decode + forward + pool + write into a
temporary cache), with the same batches (chunk-aligned), batch size, dtype and threads. Model loading is
timed apart. The overhead is (b) / (a) - 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from iisan.cache_store import CacheWriter
from iisan.cache_store.inspect import human_bytes
from iisan.extract.encode import ChunkEncoder
from iisan.extract.layers import select_layers
from iisan.extract.models import load_backbone
from iisan.extract.run import ExtractConfig, build_manifest, prepare


def run(cfg: ExtractConfig, limit: int) -> str:
    dataset, spec, info = prepare(cfg)
    layers = select_layers(cfg.layers or spec.layers, info.n_hidden_states)
    backbone = load_backbone(info, cfg.device)
    encoder = ChunkEncoder(backbone, dataset, layers, cfg.batch_size or spec.batch_size, cfg.text_field,
                           cfg.text_clean)
    n = min(limit, len(dataset.items))
    ids = dataset.items.ids[:n]
    manifest = build_manifest(cfg, dataset, info, backbone.preprocessor, layers, cfg.layers or spec.layers)
    manifest.rows = n + 1
    with tempfile.TemporaryDirectory() as tmp:
        writer = CacheWriter.open(Path(tmp) / "bench.zarr", manifest, ids)
        chunks = writer.pending_chunks()
        batches = [batch for c in chunks for batch in encoder.batches(writer.item_positions(c))]
        prepared = [encoder.inputs(batch)[0] for batch in batches]
        encoder.forward(prepared[0])  # warm-up

        def synchronize() -> None:  # GPU work is asynchronous: wait for it before reading the clock
            if backbone.device.type == "cuda":
                torch.cuda.synchronize(backbone.device)

        def bare() -> float:
            synchronize()
            start = time.perf_counter()
            for inputs in prepared:
                encoder.forward(inputs)
            synchronize()
            return time.perf_counter() - start

        first = bare()
        synchronize()
        start = time.perf_counter()
        for chunk in chunks:
            states, missing = encoder.encode(writer.item_positions(chunk))  # ends with a host copy: synchronous
            writer.write_chunk(chunk, states, missing)
        extraction = time.perf_counter() - start
        bare_seconds = (first + bare()) / 2  # bracket the extraction run to average out drift
        size = writer.backend.bytes_on_disk()
        writer.close()
    per_row = size / (n + 1)
    full_rows = len(dataset.items) + 1
    return (f"{spec.name} on {dataset.name}: {n:,} items, batch {encoder.batch_size}, {backbone.dtype}, "
            f"{torch.get_num_threads()} threads, device {backbone.device}\n"
            f"  model load            {backbone.load_seconds:8.1f} s (not counted below)\n"
            f"  bare forward          {n / bare_seconds:8.1f} items/s ({bare_seconds:.1f} s)\n"
            f"  extraction            {n / extraction:8.1f} items/s ({extraction:.1f} s)\n"
            f"  overhead              {100 * (extraction / bare_seconds - 1):8.1f} % (tokenize/decode + pool + write)\n"
            f"  cache                 {human_bytes(size)} for {n:,} items, {len(layers)} layers x "
            f"{info.hidden_size}; all {full_rows - 1:,} items: ~{human_bytes(per_row * full_rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--field", default=None)
    parser.add_argument("--limit", type=int, default=4096, help="items to run (from the top of the items file)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    cfg = ExtractConfig(model=args.model, dataset=args.dataset, text_field=args.field, batch_size=args.batch_size,
                        device=args.device, progress=False)
    print(run(cfg, args.limit), flush=True)


if __name__ == "__main__":
    main()
