"""Training configuration: one dataclass, defaults from SPEC §8, every field documented where it lives.

Resolution order: these defaults < the method's presets (train/methods.py) < the pipeline's presets in
pipelines.yaml < command-line options. The resolved config is saved with every run (config.json).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iisan.errors import RegistryError
from iisan.registry import dataset_entry, load_registry, registry_path
from iisan.train.methods import METHODS, method as method_entry



@dataclass
class TrainConfig:
    dataset: str = field(metadata={"help": "dataset name in the registry"})
    pipeline: str = field(default="", metadata={"help": "pipeline name (default: the dataset's)"})
    text: str = field(default="", metadata={"help": "MODEL or MODEL@FIELD feeding the text slot"})
    image: str = field(default="", metadata={"help": "MODEL feeding the image slot"})
    text2: str = field(default="", metadata={"help": "MODEL@FIELD feeding a second text slot"})
    layers_text: str = field(default="", metadata={"help": "cached hidden states the text tower reads (rule)"})
    layers_image: str = field(default="", metadata={"help": "cached hidden states the image tower reads"})
    method: str = field(default="iisan", metadata={"help": " | ".join(METHODS) + " (train/methods.py)"})
    cache: str = field(default="cache", metadata={"help": "cache root (stores in CACHE/<dataset>/)"})
    out: str = field(default="runs", metadata={"help": "runs root (runs in OUT/<dataset>/)"})
    epochs: int = field(default=100, metadata={"help": "maximum epochs"})
    patience: int = field(default=10, metadata={"help": "epochs without strict valid HR@10 improvement"})
    batch_size: int = field(default=64, metadata={"help": "users per batch"})
    lr: float = field(default=2e-4, metadata={"help": "Adam lr: user encoder, heads, fusion, embeddings"})
    lr_san: float = field(default=1e-4, metadata={"help": "Adam lr: SAN blocks, gates, DTLs"})
    lr_backbone_text: float = field(default=5e-5, metadata={
        "help": "Adam lr: the trainable part of the text backbone(s) (embedded methods; preset per method)"})
    lr_backbone_image: float = field(default=1e-4, metadata={
        "help": "Adam lr: the trainable part of the image backbone (embedded methods; preset per method)"})
    adapter_bottleneck: int = field(default=64, metadata={"help": "Houlsby adapter width (method adapter)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA r (method lora)"})
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha; scaling alpha / r (SPEC §7: 1)"})
    text_clean: str = field(default="clean", metadata={
        "help": "text cleaning when backbones read raw titles (embedded methods): clean | raw"})
    embedding_dim: int = field(default=64, metadata={"help": "d"})
    heads: int = field(default=2, metadata={"help": "user-encoder attention heads"})
    blocks: int = field(default=2, metadata={"help": "user-encoder blocks"})
    dropout: float = field(default=0.1, metadata={"help": "user-encoder dropout"})
    max_seq_len: int = field(default=10, metadata={"help": "L"})
    min_seq_len: int = field(default=5, metadata={"help": "users with fewer items are dropped"})
    bottleneck: int = field(default=64, metadata={"help": "r: SAN bottleneck"})
    fusion: str = field(default="gated", metadata={"help": "gated | add (ablation: no gates)"})
    intra: bool = field(default=True, metadata={"help": "intra-modal towers (ablation)"})
    inter: bool = field(default=True, metadata={"help": "inter-modal tower (ablation)"})
    standardize: str = field(default="auto", metadata={
        "help": "per-layer standardisation of cached states: auto (decoder-LLM caches) | on | off"})
    faithful: bool = field(default=True, metadata={
        "help": "mask a target already in the history (reference behaviour, a guaranteed miss)"})
    seed: int = field(default=12345, metadata={"help": "first seed"})
    seeds: int = field(default=1, metadata={"help": "number of seeds (seed, seed+1, ...)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    eval_batch_size: int = field(default=1024, metadata={"help": "users scored at once in evaluation"})
    progress: bool = field(default=True, metadata={"help": "progress bar per epoch"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < pipeline presets < overrides (None values in `overrides` mean "not given")."""
    given = {k: v for k, v in overrides.items() if v is not None}
    dataset = given["dataset"]
    pipeline = given.get("pipeline") or dataset_entry(dataset).pipeline
    pipelines = load_registry().get("pipelines") or {}
    if pipeline not in pipelines:
        raise RegistryError(f"unknown pipeline '{pipeline}'; registered in {registry_path()}: {', '.join(pipelines)}")
    preset = dict(pipelines[pipeline] or {})
    layers = preset.pop("layers", {}) or {}
    values: dict[str, Any] = {"dataset": dataset, "pipeline": pipeline,
                              "layers_text": layers.get("text", ""), "layers_image": layers.get("image", "")}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(preset) - names
    if unknown:
        raise RegistryError(f"{registry_path()}: pipeline '{pipeline}' has unknown keys {sorted(unknown)}")
    method_name = given.get("method") or preset.get("method") or "iisan"
    values.update(method_entry(method_name).presets)
    values.update(preset)
    values.update(given)
    if values.get("image") and values.get("text2"):
        raise RegistryError(f"pipeline '{pipeline}': give image or text2, not both")
    if not values.get("text") and values.get("method", "iisan") != "sasrec-id":
        raise RegistryError(f"pipeline '{pipeline}' names no text encoder")
    return TrainConfig(**values)


def load_config(path: Path) -> TrainConfig:
    import json

    return TrainConfig(**json.loads(path.read_text()))
