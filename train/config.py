"""Training configuration: one dataclass, defaults from docs/method.md §8, every field documented where it lives.

The help of each field is the one source of the `iisan train` option of the same name (iisan/cli.py generates
the options from these fields); `Literal` types become the options' choices.

Resolution order: these defaults < the method's presets (train/methods.py) < the pipeline's presets in
pipelines.yaml < command-line options. The resolved config is saved with every run (config.json), with
`version`; configs written by earlier versions are upgraded on load (`upgrade_config`) or refused with a
message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from iisan.cache_store.inspect import default_cache_root
from iisan.errors import IisanError, RegistryError
from iisan.data.dataset import default_pipeline
from iisan.data.protocol import ProtocolConfig
from iisan.registry import (dataset_entry, is_dataset_path, load_registry, locate_dataset, pipeline_where,
                            registry_path)

# 1: before the stage-2 redesign (issue 12); 2: slots named text / image / text2, ties rule, h_0 kept for
# remove_first, frozen reads the final output, standardize dim | layer.
CONFIG_VERSION = 2

Standardize = Literal["auto", "off", "dim", "layer"]
Ties = Literal["pessimistic", "optimistic"]
CacheMode = Literal["memory", "mmap"]
Fusion = Literal["gated", "add"]
TextClean = Literal["clean", "raw"]
Loss = Literal["in-batch", "sampled", "full"]
Sampler = Literal["uniform", "popularity", "mix"]
Score = Literal["dot", "cosine"]
Schedule = Literal["constant", "cosine"]


def _help(text: str, flag: str | None = None, option: str | None = None) -> dict[str, Any]:
    """A field's option: its help, the flag of a bool (`--no-inter`), or another option name than the field's
    (`--cache-dir` for `cache`: one name per meaning on every command, iisan/cli.py's VOCABULARY)."""
    return {"help": text, **({"flag": flag} if flag else {}), **({"option": option} if option else {})}


@dataclass
class TrainConfig:
    # --- data and the encoders feeding each slot
    dataset: str = field(metadata=_help(
        "Dataset: a name in pipelines.yaml, or a dataset folder (a path; its dataset.yaml or its files describe it)."))
    pipeline: str = field(default="", metadata=_help("Pipeline in pipelines.yaml (default: the dataset's)."))
    text: str = field(default="", metadata=_help(
        "Text encoder: MODEL[@FIELD] feeding the text slot (overrides the pipeline)."))
    image: str = field(default="", metadata=_help("Image encoder: MODEL feeding the image slot."))
    text2: str = field(default="", metadata=_help("MODEL@FIELD feeding a second text slot (multimodal text)."))
    layers_text: str = field(default="", metadata=_help(
        "Cached hidden states the text tower reads: even | remove_first | group:<L> | top:<N> | bottom:<N> | all | "
        "i,j,… (default: all cached)."))
    layers_image: str = field(default="", metadata=_help(
        "Cached hidden states the second slot's tower (image or text2) reads (same rules)."))
    cache: str = field(default="", metadata=_help("Cache root (default $IISAN_CACHE_DIR, else cache/).",
                                                  option="--cache-dir"))
    out: str = field(default="runs", metadata=_help("Runs root: runs go to RUNS_DIR/<dataset>/.", option="--runs-dir"))
    min_seq_len: int = field(default=5, metadata=_help("Users with fewer items are dropped."))
    max_seq_len: int = field(default=10, metadata=_help("L: the user encoder's window."))
    cold_items: float = field(default=0.0, metadata=_help(
        "Cold-start protocol: withhold this fraction of items (e.g. 0.1, chosen by a hash of the item id) from "
        "the training sequences; they stay valid / test targets (docs/method.md §1.2.8). 0: the usual protocol."))
    cold_seed: int = field(default=0, metadata=_help("Cold-start protocol: the seed of the hash that picks the withheld items."))
    standardize: Standardize = field(default="auto", metadata=_help(
        "Standardise cached states with statistics of the training items: dim (per layer and dimension), "
        "layer (one mean / std per layer), off; auto: decoder-LLM caches only (docs/method.md §6.2)."))
    # --- the method and its model
    method: str = field(default="iisan", metadata=_help(
        "Training method, registered in train/methods.py (`iisan train --help` lists them)."))
    embedding_dim: int = field(default=64, metadata=_help("d: item and user embedding width."))
    heads: int = field(default=2, metadata=_help("User-encoder attention heads."))
    blocks: int = field(default=2, metadata=_help("User-encoder blocks."))
    dropout: float = field(default=0.1, metadata=_help("User-encoder dropout."))
    bottleneck: int = field(default=64, metadata=_help("r: SAN block bottleneck width."))
    fusion: Fusion = field(default="gated", metadata=_help("gated, or add: the no-gate ablation."))
    intra: bool = field(default=True, metadata=_help("Ablation: no intra-modal towers.", "--no-intra"))
    inter: bool = field(default=True, metadata=_help("Ablation: no inter-modal tower.", "--no-inter"))
    id_dropout: float = field(default=0.2, metadata=_help(
        "iisan-hybrid: probability that an item occurrence's ID part is zeroed in training."))
    id_dropout_unit: Literal["occurrence", "item"] = field(default="occurrence", metadata=_help(
        "iisan-hybrid: what --id-dropout drops: each occurrence's ID part on its own, or whole items (an item's "
        "ID part off everywhere in a training step, as a cold item has none)."))
    lr_id: float = field(default=0.0, metadata=_help("iisan-hybrid: Adam lr of the ID table (0: --lr)."))
    id_init: Literal["zero", "xavier"] = field(default="zero", metadata=_help(
        "iisan-hybrid: the ID table's start, zero (starts as IISAN) or xavier (as SASRec's)."))
    content_loss: float = field(default=0.0, metadata=_help(
        "iisan-hybrid: weight of a second loss on the content-only embeddings (every ID part off), so the content "
        "path stays a recommender on its own (0: none)."))
    cold_merge: bool = field(default=False, metadata=_help(
        "iisan-hybrid: train a content-only twin alongside (its own user encoder, the same loss over the content "
        "embeddings) and rank items never seen in training by it, each user's twin scores mapped onto the "
        "hybrid's by their mean and spread over the seen items (docs/method.md §7.1)."))
    # --- the training objective (docs/method.md §3)
    loss: Loss = field(default="in-batch", metadata=_help(
        "in-batch: the batch's items as the softmax's columns, each debiased by log p; sampled: those plus "
        "--negatives catalogue items drawn per batch (--sampler), every column log-Q corrected; full: a softmax "
        "over every training item (the item tower runs over all of them each step)."))
    negatives: int = field(default=1024, metadata=_help(
        "--loss sampled: catalogue items drawn per batch (with replacement, from the training items)."))
    sampler: Sampler = field(default="uniform", metadata=_help(
        "--loss sampled: draw the catalogue items uniformly, by training popularity, or half and half (mix)."))
    score: Score = field(default="dot", metadata=_help(
        "How a user scores an item: dot product, or cosine / --temperature (the ranking uses the same score)."))
    temperature: float = field(default=0.1, metadata=_help(
        "--score cosine: the softmax temperature (the start value with --learn-temperature)."))
    learn_temperature: bool = field(default=False, metadata=_help(
        "--score cosine: learn the temperature (kept >= 0.01) with the model, at --lr."))
    softmax_chunk: int = field(default=4096, metadata=_help(
        "--loss sampled / full: items the item tower encodes at once for the catalogue columns (several chunks "
        "are recomputed in the backward pass: memory holds one chunk's activations)."))
    # --- optimisation
    epochs: int = field(default=100, metadata=_help("Maximum epochs."))
    patience: int = field(default=10, metadata=_help(
        "Early-stopping patience: stop after this many epochs without a strict valid HR@10 gain."))
    batch_size: int = field(default=64, metadata=_help("Users per batch."))
    lr: float = field(default=2e-4, metadata=_help("Adam lr: user encoder, heads, fusion, embeddings."))
    lr_san: float = field(default=1e-4, metadata=_help("Adam lr: SAN blocks, gates, DTLs."))
    weight_decay: float = field(default=0.0, metadata=_help(
        "AdamW's decoupled weight decay, on weight matrices and embeddings (not biases, norms, gates); 0: Adam."))
    warmup_steps: int = field(default=0, metadata=_help("Steps of linear learning-rate warm-up from 0."))
    schedule: Schedule = field(default="constant", metadata=_help(
        "Learning rate after the warm-up: constant, or cosine decay to 0 at --epochs (the epoch cap)."))
    clip: float = field(default=0.0, metadata=_help("Clip the gradients' global norm to this (0: no clipping)."))
    seed: int = field(default=12345, metadata=_help("Seed of the first run."))
    seeds: int = field(default=1, metadata=_help("Seeds: run N (seed, seed + 1, …) and report mean ± std."))
    device: str = field(default="auto", metadata=_help("Device: auto (cuda if present) | cpu | cuda | cuda:N."))
    # --- evaluation
    faithful: bool = field(default=True, metadata=_help(
        "Keep a target that is already in the history unmasked (default: faithful masking, a guaranteed miss).",
        "--fixed-eval"))
    ties: Ties = field(default="pessimistic", metadata=_help(
        "Tie rule: the rank of a target tied with other items, pessimistic (1 + the other unmasked items scoring >= it) or "
        "optimistic (1 + those scoring strictly higher)."))
    cache_mode: CacheMode = field(default="memory", metadata=_help(
        "memory: the needed layers are read into memory once; mmap: laid once into a memory-mapped .npy file "
        "beside the store (reused while the same) and gathered per batch from it, so the process's own memory "
        "does not grow with the cache (docs/design.md)."))
    eval_batch_size: int = field(default=1024, metadata=_help("Users scored at once in evaluation."))
    eval_item_tile: int = field(default=262_144, metadata=_help(
        "Items scored at once in evaluation: with more items, users are scored in user x item tiles (memory "
        "eval-batch-size x tile, exact ranks across tiles)."))
    progress: bool = field(default=True, metadata=_help("No progress bar.", "--no-progress"))
    # --- end-to-end baselines only (the backbones run on raw items every step)
    lr_backbone_text: float = field(default=5e-5, metadata=_help(
        "End-to-end methods: Adam lr of the trainable part of the text backbone(s) (preset per method)."))
    lr_backbone_image: float = field(default=1e-4, metadata=_help(
        "End-to-end methods: Adam lr of the trainable part of the image backbone (preset per method)."))
    adapter_bottleneck: int = field(default=64, metadata=_help("Houlsby adapter width (method adapter)."))
    lora_rank: int = field(default=8, metadata=_help("LoRA r (method lora)."))
    lora_alpha: float = field(default=1.0, metadata=_help("LoRA alpha; scaling alpha / r (docs/method.md §7: 1)."))
    text_clean: TextClean = field(default="clean", metadata=_help(
        "Title cleaning before tokenizing, end-to-end methods: clean (unescape + strip) or raw."))
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        ProtocolConfig(self.max_seq_len, self.min_seq_len, self.cold_items, self.cold_seed)  # refuses bad values
        for name, ok, rule in (("negatives", self.negatives >= 1, ">= 1"),
                               ("temperature", self.temperature > 0, "> 0"),
                               ("softmax_chunk", self.softmax_chunk >= 1, ">= 1"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                               ("clip", self.clip >= 0, ">= 0")):
            if not ok:
                raise IisanError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be {rule}")
        if self.id_dropout_unit != "occurrence" and self.method != "iisan-hybrid":
            raise IisanError(f"--id-dropout-unit is an option of iisan-hybrid, not of {self.method}")
        if self.cold_merge and self.method != "iisan-hybrid":
            raise IisanError(f"--cold-merge is an option of iisan-hybrid, not of {self.method}")
        if self.cold_merge and self.score != "dot":
            raise IisanError("--cold-merge ranks by dot products: give --score dot")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(overrides: dict[str, Any], log: Callable[[str], None] | None = None) -> TrainConfig:
    """Defaults < method presets < pipeline presets < overrides (None values in `overrides` mean "not given").
    A dataset given as a folder is recorded as its absolute path. Without a pipeline, the dataset's default
    is taken (its own, else by the modalities it has) and `log` is told which and why."""
    from iisan.train.methods import method as method_entry

    given = {k: v for k, v in overrides.items() if v is not None}
    dataset = given["dataset"]
    if is_dataset_path(dataset):
        dataset = given["dataset"] = str(Path(dataset).expanduser().resolve())
    pipeline = given.get("pipeline")
    if not pipeline:
        # a registered name whose entry names its pipeline needs no folder (a plan resolves without the data)
        entry = (dataset_entry(dataset) if not is_dataset_path(dataset)
                 and dataset in (load_registry().get("datasets") or {}) else None)
        pipeline, why = ((entry.pipeline, f"set for dataset '{dataset}' in {registry_path()}")
                         if entry is not None and entry.pipeline else default_pipeline(locate_dataset(dataset)))
        if log is not None:
            log(f"pipeline {pipeline} ({why}; --pipeline chooses another)")
    pipelines = load_registry().get("pipelines") or {}
    if pipeline not in pipelines:
        raise RegistryError(f"unknown pipeline '{pipeline}'; registered in {registry_path()}: {', '.join(pipelines)}")
    preset = dict(pipelines[pipeline] or {})
    layers = preset.pop("layers", {}) or {}
    values: dict[str, Any] = {"dataset": dataset, "pipeline": pipeline,
                              "layers_text": layers.get("text", ""), "layers_image": layers.get("image", "")}
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"version"}
    unknown = set(preset) - names
    if unknown:
        raise RegistryError(f"{pipeline_where(pipeline)}: pipeline '{pipeline}' has unknown keys {sorted(unknown)}")
    method = method_entry(given.get("method") or preset.get("method") or "iisan")
    values.update(method.presets)
    values.update(preset)
    values.update(given)
    values["cache"] = str(values.get("cache") or default_cache_root())
    if values.get("image") and values.get("text2"):
        raise RegistryError(f"pipeline '{pipeline}': give image or text2, not both")
    if not values.get("text") and method.needs_content:
        raise RegistryError(f"pipeline '{pipeline}' names no text encoder")
    return TrainConfig(**values)


def upgrade_config(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A saved config as this version reads it. Version 1 (no `version` field): `standardize: on` meant `dim`;
    its ranks counted ties in the target's favour (`ties: optimistic`); runs whose meaning changed since are
    refused, naming the field."""
    raw = dict(raw)
    version = raw.pop("version", 1)
    if version > CONFIG_VERSION:
        raise IisanError(f"{where}: config version {version} is newer than this package reads ({CONFIG_VERSION})")
    if version == 1:
        if raw.get("standardize") == "on":
            raw["standardize"] = "dim"
        raw.setdefault("ties", "optimistic")
        for key in ("layers_text", "layers_image"):
            if raw.get(key) == "remove_first":
                raise IisanError(f"{where}: field {key} = remove_first: this run's towers started from 0 without "
                                 f"h_0; remove_first now starts each intra tower from h_0 (docs/method.md §5.2). "
                                 f"Train it again")
        if raw.get("method") == "frozen" and raw.get("image"):
            raise IisanError(f"{where}: field method = frozen with an image slot: this run read the last cached "
                             f"hidden state, before the image model's final norm; the frozen baseline now reads "
                             f"the final output (docs/method.md §7). Train it again")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise IisanError(f"{where}: unknown field(s) {', '.join(unknown)} (written by another version?)")
    raw["version"] = CONFIG_VERSION
    return raw


def load_config(path: Path) -> TrainConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IisanError(f"{path}: cannot read the run's config ({e})") from None
    return TrainConfig(**upgrade_config(raw, str(path)))


def saved_version(path: Path) -> int:
    """The config version a run folder's config.json was written with (1 before the field existed)."""
    return int(json.loads(path.read_text()).get("version", 1))
