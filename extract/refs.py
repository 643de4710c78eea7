"""What a model reference names, read from the model's own files: no registry entry needed.

A model ref is a registered name (pipelines.yaml), `hf:ORG/NAME` (a Hugging Face hub id), or a path (a model
folder holding config.json and weights, a folder holding one .gguf file, or a .gguf file). A value is a path
if it contains `/` (and does not start with `hf:`), ends in `.gguf`, or names an existing directory; `@` is
reserved for `MODEL@FIELD` in training options and never part of a ref.

From the config (`model_type`, `architectures`, `quantization_config`), a sentence-transformers pooling module
where there is one, or a GGUF file's `general.architecture`, `infer_spec_fields` says the kind (text / image),
family (encoder / decoder / vision), pooling and quantization, so that `models.spec_for` can build a ModelSpec.
`store_name` is the one safe form of a ref that names its cache store, for extraction and training alike.
`weights_sha256` hashes the weight files' bytes, so that a store is never resumed with other weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iisan.extract.models import ModelError

HUB_PREFIX = "hf:"

# model_type -> what it is. Single-tower types first; anything else whose architectures end in ForCausalLM or
# LMHeadModel is a decoder too.
TEXT_ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "mpnet", "albert", "electra", "deberta",
    "deberta-v2", "camembert", "ernie", "modernbert", "megatron-bert", "mobilebert", "squeezebert", "roformer",
    "nezha", "luke", "data2vec-text", "longformer", "big_bird", "nomic_bert", "jina_bert", "flaubert", "xmod"})
DECODER_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "phi", "phi3", "falcon", "opt", "bloom", "stablelm", "starcoder2",
    "olmo", "olmo2", "cohere", "granite", "smollm3", "mpt", "codegen", "deepseek_v2", "deepseek_v3", "internlm2"})
VISION_TYPES = frozenset({
    "vit", "dinov2", "dinov2_with_registers", "dinov3_vit", "deit", "beit", "data2vec-vision", "vit_msn", "ijepa"})
# Vision backbones whose stages have different widths (feature maps [B, C_i, H_i, W_i]): the cache stores one
# width D per model, so they are recognised and refused rather than pooled wrongly.
HIERARCHICAL_VISION_TYPES = frozenset({
    "convnext", "convnextv2", "swin", "swinv2", "resnet", "regnet", "efficientnet", "mobilenet_v1", "mobilenet_v2",
    "levit", "poolformer", "van", "focalnet", "dinat", "nat", "pvt", "pvt_v2", "mobilevit"})
# Two-tower (contrastive) models: per kind, the transformers class of that tower and its pooling. CLIP's text
# tower reads its end-of-text token (the last real one); SigLIP's vision tower has no CLS token.
TWO_TOWERS: dict[str, dict[str, tuple[str, str]]] = {
    "clip": {"text": ("CLIPTextModel", "last"), "image": ("CLIPVisionModel", "cls")},
    "siglip": {"text": ("SiglipTextModel", "last"), "image": ("SiglipVisionModel", "mean")},
    "siglip2": {"text": ("Siglip2TextModel", "last"), "image": ("Siglip2VisionModel", "mean")},
    "chinese_clip": {"text": ("ChineseCLIPTextModel", "cls"), "image": ("ChineseCLIPVisionModel", "cls")},
}
# sentence-transformers Pooling config keys -> pooling (max and mean-sqrt-len have no equivalent here).
ST_POOLING_KEYS = (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                   ("pooling_mode_lasttoken", "last"))


class ModelRefError(ModelError):
    """A model ref is malformed, or what it points at cannot tell what the model is."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed ref that is not a registered name: a hub id, or a local folder (with its GGUF file, if any)."""

    text: str                     # as given
    hub_id: str | None = None     # ORG/NAME for hf: refs
    folder: Path | None = None    # absolute folder for path refs
    gguf_file: str | None = None  # the .gguf file inside `folder` (path refs to GGUF checkpoints)

    @property
    def source(self) -> str:
        return self.hub_id if self.hub_id else str(self.folder)


def check_ref(ref: str) -> None:
    if not ref.strip():
        raise ModelRefError("empty model ref: give a name in pipelines.yaml, hf:ORG/NAME, or a model folder")
    if "@" in ref:
        raise ModelRefError(f"model ref '{ref}' contains '@', which is reserved for MODEL@FIELD in training options "
                            f"(--text MODEL@FIELD); give the model alone (and --field FIELD to `iisan extract`)")


def is_path_ref(ref: str) -> bool:
    """A path: contains `/` (not an hf: ref), ends in .gguf, or names an existing directory."""
    if ref.startswith(HUB_PREFIX):
        return False
    return "/" in ref or ref.endswith(".gguf") or Path(ref).expanduser().is_dir()


def store_name(ref: str, tower: str | None = None) -> str:
    """The model name a cache store of `ref` goes by: its file name and manifest `model`, and what training
    looks for. Registered names stay as they are; `hf:ORG/NAME` -> `ORG--NAME`; a folder -> its folder name;
    a .gguf file -> its stem. `tower` (text | image) is appended as `--text` / `--image` for one tower of a
    two-tower model, whose two stores would otherwise share a name. The result holds no `@`, `/` or `:`."""
    if ref.startswith(HUB_PREFIX):
        base = ref[len(HUB_PREFIX):].strip("/").replace("/", "--")
    elif is_path_ref(ref):
        path = Path(ref).expanduser()
        path = path if path.name not in ("", ".", "..") else path.resolve()
        base = path.stem if path.suffix == ".gguf" else path.name
    else:
        base = ref
    base = re.sub(r"[^A-Za-z0-9._+-]", "-", base) or "model"
    return f"{base}--{tower}" if tower else base


def parse_ref(ref: str, revision: str | None = None) -> ModelRef:
    """A hub id or a local folder (resolved, checked to exist and to hold config.json or one .gguf file)."""
    check_ref(ref)
    if ref.startswith(HUB_PREFIX):
        hub_id = ref[len(HUB_PREFIX):].strip("/")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", hub_id):
            raise ModelRefError(f"'{ref}': expected hf:ORG/NAME (a Hugging Face hub id)")
        return ModelRef(ref, hub_id=hub_id)
    if revision:
        raise ModelRefError(f"--revision is for hub ids (hf:ORG/NAME); '{ref}' is a local path, whose revision is "
                            f"a hash of its files")
    path = Path(ref).expanduser().resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelRefError(f"'{ref}' is a file; give the model folder (holding config.json and the weights) "
                                f"or a .gguf file")
        return ModelRef(ref, folder=path.parent, gguf_file=path.name)
    if not path.is_dir():
        raise ModelRefError(f"no model folder or .gguf file at '{path}'")
    if (path / "config.json").is_file():
        return ModelRef(ref, folder=path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelRef(ref, folder=path, gguf_file=ggufs[0])
    if ggufs:
        raise ModelRefError(f"model folder '{path}' holds several .gguf files ({', '.join(ggufs)}): choose one with "
                            f"--model {path}/FILE.gguf")
    raise ModelRefError(f"model folder '{path}' holds neither a config.json nor a .gguf file: a Hugging Face model "
                        f"folder has config.json next to its weights (save_pretrained writes both)")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def offline_message(ref: str, hub_id: str) -> str:
    return (f"model '{ref}': the Hugging Face hub is offline (HF_HUB_OFFLINE=1) and '{hub_id}' is not in the local "
            f"HF cache; point at a local copy with --model PATH (a folder holding config.json and the weights), "
            f"or set HF_HUB_OFFLINE=0 with network access to download it")


def _hub_file(hub_id: str, name: str, revision: str | None) -> Path | None:
    """A file of a hub repo (from the HF cache, or downloaded), None if the repo has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(hub_id, name, revision=revision))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _read_json(path: Path | None, shape: type = dict) -> Any:
    """The JSON object (or list) in `path`; None if there is no such file or it holds something else."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelRefError(f"{path}: not readable JSON ({e})") from None
    return data if isinstance(data, shape) else None


@dataclass
class ModelFiles:
    """The small files that say what a model is: config.json and a sentence-transformers pooling config."""

    config: dict[str, Any] | None
    st_pooling: dict[str, Any] | None
    gguf_architecture: str | None = None


def read_model_files(model: ModelRef, revision: str | None = None) -> ModelFiles:
    """config.json and any sentence-transformers pooling config of a folder or hub repo (from the HF cache, or
    downloaded: a few KB), or a GGUF file's architecture. A hub id offline and not cached is refused here, with
    how to point at a local copy instead."""
    if model.hub_id:
        from huggingface_hub import try_to_load_from_cache

        if hub_offline() and not isinstance(try_to_load_from_cache(model.hub_id, "config.json", revision=revision),
                                            str):
            raise ModelRefError(offline_message(model.text, model.hub_id))
        try:
            config_path = _hub_file(model.hub_id, "config.json", revision)
        except Exception as e:  # network, authentication, unknown repo
            raise ModelRefError(f"model '{model.text}': cannot read config.json of '{model.hub_id}' from the "
                                f"Hugging Face hub ({e.__class__.__name__}: {e}); check the id, log in for gated "
                                f"models (`hf auth login`), or download it and pass --model PATH") from None
        if config_path is None:
            raise ModelRefError(f"model '{model.text}': the hub repo '{model.hub_id}' has no config.json (a GGUF-only "
                                f"repo? download the .gguf file and pass --model PATH/FILE.gguf)")
        read = lambda name: _hub_file(model.hub_id, name, revision)  # noqa: E731
    else:
        assert model.folder is not None
        if model.gguf_file:
            return ModelFiles(None, None, gguf_architecture(model.folder / model.gguf_file))
        read = lambda name: model.folder / name  # noqa: E731
    modules = _read_json(read("modules.json"), list)  # a sentence-transformers folder lists its modules
    pooling = None
    if modules is not None:
        path = next((m.get("path") for m in modules if isinstance(m, dict)
                     and str(m.get("type", "")).endswith("Pooling")), "1_Pooling")
        pooling = _read_json(read(f"{path}/config.json"))
    return ModelFiles(_read_json(read("config.json")), pooling)


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file (e.g. llama), from its header; None if it cannot be read."""
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.architecture")
        return bytes(field.parts[field.data[0]]).decode() if field is not None else None
    except Exception:
        return None


def _quantization(config: dict[str, Any], where: str) -> str:
    q = config.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    if not method:
        return "none"
    if method == "gptq":
        return "gptq"
    if method == "bitsandbytes":
        if q.get("load_in_4bit"):
            return "bnb-4bit"
        if q.get("load_in_8bit"):
            return "bnb-8bit"
    raise ModelRefError(f"{where}: quantization_config.quant_method '{method}' is not supported (gptq, bitsandbytes "
                        f"4/8-bit, or a GGUF file)")


def _family_of(model_type: str, architectures: list[str]) -> str | None:
    if model_type in DECODER_TYPES or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "decoder"
    if model_type in TEXT_ENCODER_TYPES:
        return "encoder"
    if model_type in VISION_TYPES:
        return "vision"
    return None


def infer_spec_fields(model: ModelRef, files: ModelFiles, kind: str | None = None, family: str | None = None,
                      pooling: str | None = None) -> dict[str, Any]:
    """ModelSpec fields (kind, family, pooling, quantization, gguf_file, model_class, dtype) for a hub or folder
    model, from its files; `kind` / `family` / `pooling` override what the files say."""
    where = f"model '{model.text}'"
    fields: dict[str, Any] = {}
    if model.gguf_file:  # GGUF checkpoints in transformers are decoder LLMs (llama, qwen2, phi3, ...)
        fields.update(kind="text", family="decoder", quantization="gguf", gguf_file=model.gguf_file)
        if files.gguf_architecture and files.gguf_architecture not in DECODER_TYPES:
            fields["family"] = _family_of(files.gguf_architecture, []) or "decoder"
    else:
        config = files.config or {}
        model_type = str(config.get("model_type", ""))
        architectures = [str(a) for a in config.get("architectures") or []]
        described = f"{where} (model_type '{model_type}', architectures {architectures})"
        fields["quantization"] = _quantization(config, where)
        if model_type in TWO_TOWERS:
            towers = TWO_TOWERS[model_type]
            if kind not in towers:
                raise ModelRefError(f"{described} has two towers: choose one with --kind text or --kind image")
            model_class, tower_pooling = towers[kind]
            fields.update(kind=kind, family="encoder" if kind == "text" else "vision", pooling=tower_pooling,
                          model_class=model_class)
        elif model_type in HIERARCHICAL_VISION_TYPES:
            raise ModelRefError(f"{described} is a hierarchical vision backbone whose stages differ in width; the "
                                f"cache keeps one width per model: use a ViT-style encoder (vit, dinov2, deit, beit)")
        else:
            found = _family_of(model_type, architectures)
            if found is None and not (kind or family):
                raise ModelRefError(f"{described}: cannot tell what kind of model this is; pass --kind text|image "
                                    f"and --family encoder|decoder|vision")
            found = found or family or ("vision" if kind == "image" else "encoder")
            natural = "image" if found == "vision" else "text"
            if kind and kind != natural and _family_of(model_type, architectures) is not None:
                raise ModelRefError(f"{described} is a {natural} model; --kind {kind} does not apply")
            fields.update(kind=kind or natural, family=found)
        if files.st_pooling:
            chosen = next((mode for key, mode in ST_POOLING_KEYS if files.st_pooling.get(key)), None)
            if chosen:
                fields["pooling"] = chosen
        saved = str(config.get("dtype") or config.get("torch_dtype") or "")
        if saved == "bfloat16" and fields["quantization"] == "none":
            fields["dtype"] = (("cpu", "float32"), ("cuda", "bfloat16"))
    if family:
        fields["family"] = family
    if pooling:
        fields["pooling"] = pooling
    return fields


def weight_files(folder: Path, gguf_file: str | None = None) -> list[Path]:
    """The files transformers loads the weights from: the GGUF file, else the top-level .safetensors files,
    else the .bin ones (training_args.bin aside)."""
    if gguf_file:
        return [folder / gguf_file]
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(p for p in folder.glob("*.bin") if p.name != "training_args.bin")


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks; remembered per (path, size, mtime) within a process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def weights_sha256(files: list[Path]) -> str:
    """One file: its sha256 (what `sha256sum FILE` prints). Several (shards): the sha256 of their
    `sha256sum`-style listing ("<hex>  <name>\\n" per file, sorted by name). "" when there is none."""
    if not files:
        return ""
    if len(files) == 1:
        return file_sha256(files[0])
    listing = "".join(f"{file_sha256(p)}  {p.name}\n" for p in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(listing.encode()).hexdigest()
