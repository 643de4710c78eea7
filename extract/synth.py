"""`iisan data synth`: a synthetic dataset and a matching cache, for scale tests and benchmarks
(`make bench-scale`), written through the same store contract as an extraction.

Planted structure that training can learn: items fall into clusters of about `cluster_size`; each item has a
latent vector (its cluster's centre plus noise, r = 16). A user starts in a random cluster and, at each next
interaction, stays in the cluster of the previous item with probability `stay`, else jumps to a random one,
taking a uniform item of that cluster. Each cached "hidden state" k is a fixed random projection of the latent
vector to D dimensions plus noise that shrinks with depth (so deeper layers carry more of the signal, as in a
real backbone). A content model thus learns "the next item is near the last one": HR@10 well above chance
(10 / items), which the tests assert.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from iisan.cache_store import CacheWriter, Manifest, store_path
from iisan.cache_store.inspect import default_cache_root
from iisan.data.dataset import fingerprint_inputs, load_dataset
from iisan.data.layout import write_lines
from iisan.errors import IisanError

LATENT = 16
MODEL = "synth"


@dataclass
class SynthConfig:
    users: int
    items: int
    out: Path
    dim: int = 384
    layers: int = 7
    seed: int = 0
    cache: Path | None = None       # cache root (default: the default one); the store is <root>/<name>/synth.zarr
    min_len: int = 5
    max_len: int = 20
    cluster_size: int = 20
    stay: float = 0.8
    chunk_rows: int = 8192
    force: bool = False


@dataclass
class SynthResult:
    folder: Path
    store: Path
    interactions: int
    seconds: float

    def summary(self) -> list[str]:
        return [f"wrote {self.folder} ({self.interactions:,} interactions) and {self.store} in {self.seconds:.1f} s",
                f"train on it: iisan train --dataset {self.folder} --pipeline text-only --text {MODEL}"
                + (f" --cache-dir {self.store.parent.parent}" if self.store.parent.parent != default_cache_root() else "")]


def _check(cfg: SynthConfig) -> None:
    for name in ("users", "items", "dim", "layers", "min_len", "cluster_size", "chunk_rows"):
        if getattr(cfg, name) < 1:
            raise IisanError(f"synth: --{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.items < 2 * cfg.cluster_size:
        raise IisanError(f"synth: --items {cfg.items} gives fewer than two clusters of {cfg.cluster_size}")
    if cfg.max_len < max(cfg.min_len, 3):
        raise IisanError(f"synth: max_len {cfg.max_len} must be at least 3 and at least min_len {cfg.min_len}")
    if not 0 <= cfg.stay <= 1:
        raise IisanError(f"synth: stay {cfg.stay} must lie in [0, 1]")
    if Path(cfg.out).exists() and any(Path(cfg.out).iterdir()) and not cfg.force:
        raise IisanError(f"{cfg.out}: exists and is not empty (--force replaces it)")


def synth(cfg: SynthConfig, log: Callable[[str], None] = print) -> SynthResult:
    _check(cfg)
    began = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    clusters = cfg.items // cfg.cluster_size
    cluster_of = np.arange(cfg.items) % clusters                      # item i (0-based) is in cluster i mod C
    members = [np.arange(c, cfg.items, clusters) for c in range(clusters)]
    latent = (rng.standard_normal((clusters, LATENT))[cluster_of]
              + 0.3 * rng.standard_normal((cfg.items, LATENT))).astype(np.float32)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [f"s{i}" for i in range(cfg.items)]
    write_lines(out / "items.tsv", [f"{ids[i]}\tsynthetic item {i} of cluster {cluster_of[i]}" for i in range(cfg.items)])
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, cfg.users)
    total = int(lengths.sum())
    # every step: stay in the previous item's cluster, or jump; then a uniform member of the cluster
    jumps = rng.random(total) >= cfg.stay
    jump_to = rng.integers(0, clusters, total)
    pick = rng.random(total)
    lines, at = [], 0
    for u, n in enumerate(lengths):
        cluster = int(jump_to[at])
        seq = []
        for j in range(n):
            if j and jumps[at + j]:
                cluster = int(jump_to[at + j])
            group = members[cluster]
            seq.append(ids[group[int(pick[at + j] * len(group))]])
        at += n
        lines.append(f"u{u}\t" + " ".join(seq))
        if cfg.users >= 100_000 and (u + 1) % 100_000 == 0:
            log(f"synth: {u + 1:,} of {cfg.users:,} users")
    write_lines(out / "users.tsv", lines)
    name = out.resolve().name
    (out / "dataset.yaml").write_text(f"# iisan data synth --n-users {cfg.users} --n-items {cfg.items} --dim {cfg.dim} "
                                      f"--n-states {cfg.layers} --seed {cfg.seed}\nname: {name}\nfields: [title]\n"
                                      f"pipeline: text-only\n", encoding="utf-8")

    dataset = load_dataset(out)
    inputs = fingerprint_inputs(["title"], False, {"synth_seed": str(cfg.seed)})
    manifest = Manifest(dataset=dataset.name, dataset_fingerprint=dataset.fingerprint_of(inputs),
                        fingerprint_inputs=inputs, model=MODEL, model_source=f"iisan data synth (seed {cfg.seed})",
                        pooling="mean", layers=list(range(cfg.layers)), total_layers=cfg.layers, hidden_size=cfg.dim,
                        rows=cfg.items + 1, chunk_rows=cfg.chunk_rows, storage_dtype="float16", text_field="title",
                        final_state="last_layer", layer_selection="all",
                        preprocessing={"synth": {"latent": LATENT, "cluster_size": cfg.cluster_size,
                                                 "stay": cfg.stay}})
    path = store_path(cfg.cache or default_cache_root(), dataset.name, MODEL)
    projections = rng.standard_normal((cfg.layers, LATENT, cfg.dim)).astype(np.float32) / np.sqrt(LATENT)
    noise = np.linspace(2.0, 0.5, cfg.layers, dtype=np.float32)
    with CacheWriter.open(path, manifest, ids, overwrite=True) as writer:
        for chunk in writer.pending_chunks():
            positions = writer.item_positions(chunk)
            z = latent[positions.start:positions.stop]
            chunk_rng = np.random.default_rng([cfg.seed, chunk])
            states = np.stack([z @ projections[k] + noise[k] * chunk_rng.standard_normal((len(z), cfg.dim),
                                                                                         dtype=np.float32)
                               for k in range(cfg.layers)], axis=1)
            writer.write_chunk(chunk, states)
        writer.finalize(time.perf_counter() - began)
    return SynthResult(out, path, total, time.perf_counter() - began)
