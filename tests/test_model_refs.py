"""Encoders named by a hub id or a folder instead of a registry entry (`iisan extract --model hf:ORG/NAME | PATH`):
the spec read from the model's config, extraction through the real CLI into a store named by the safe form of
the ref, the weight hash that refuses other weights, the training-side lookup, the error cases, `--dry-run`."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iisan.cache_store import open_cache
from iisan.cache_store.inspect import verify_store
from iisan.cli import main as iisan_cli
from iisan.errors import IisanError
from iisan.extract.encode import clean_text
from iisan.extract.models import spec_for
from iisan.extract.refs import store_name
from iisan.train.data import SlotSource, _find_store, _is_decoder

from conftest import write_tsv
from tiny_models import WORDS, build_tiny_bert, build_tiny_llama, llama_tokenizer, write_registry

N_ITEMS = 40


def image_processor():
    from transformers import BitImageProcessor

    return BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                             do_convert_rgb=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build_tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)).save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path) -> Path:
    """A CLIP checkpoint: a 2-block text tower (the tiny Llama tokenizer) and a 3-block vision tower."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = llama_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=40, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder


def build_sentence_transformer(folder: Path, bert: Path) -> Path:
    """A sentence-transformers folder: the model at the top, its Pooling module (mean) in 1_Pooling/."""
    shutil.copytree(bert, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    return folder


def write_gguf(path: Path, architecture: str = "llama") -> Path:
    """A GGUF file holding only its header and `general.architecture`: enough to recognise, not to load."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), architecture)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def config_only(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refs-zoo")
    bert = build_tiny_bert(root / "bert")
    return {"bert": bert, "vit": build_tiny_vit(root / "vit"), "llama": build_tiny_llama(root / "llama", hidden=32),
            "clip": build_tiny_clip(root / "clip"), "st": build_sentence_transformer(root / "st-minilm", bert),
            "gguf": write_gguf(root / "smol" / "smol-q4.gguf").parent}


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Path:
    """Dataset `toy`: 40 items, every other one with an image; a registry that names no model."""
    from PIL import Image

    rng = random.Random(0)
    items = [f"it{k:03d}\t" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))) for k in range(N_ITEMS)]
    data = tmp_path / "data"
    write_tsv(data / "toy" / "items.tsv", items)
    write_tsv(data / "toy" / "users.tsv", ["u0\tit000 it001 it002 it003 it004"])
    (data / "toy" / "images").mkdir()
    pixels = np.random.default_rng(0)
    for k in range(0, N_ITEMS, 2):
        Image.fromarray(pixels.integers(0, 255, (36, 30, 3), dtype=np.uint8)).save(
            data / "toy" / "images" / f"it{k:03d}.jpg")
    monkeypatch.setenv("IISAN_PIPELINES", str(write_registry(tmp_path / "pipelines.yaml", {}, {"toy": {}})))
    monkeypatch.setenv("IISAN_DATA_DIR", str(data))
    return tmp_path


def cli(*args: str):
    return CliRunner().invoke(iisan_cli, list(args))


def extract_cli(toy: Path, model: Path | str, *extra: str):
    return cli("extract", "--model", str(model), "--dataset", "toy", "--out", str(toy / "cache"), "--no-progress",
               "--dtype", "float32", "--chunk-rows", "16", *extra)


def manifest_and_states(path: Path):
    with open_cache(path) as store:
        return store.manifest, store.backend.read_rows(0, store.manifest.rows)


@pytest.mark.parametrize("model, kind, expected", [
    ("bert", None, ("bert", "text", "encoder", "cls", "none", "")),
    ("vit", None, ("vit", "image", "vision", "cls", "none", "")),
    ("llama", None, ("llama", "text", "decoder", "last", "none", "")),
    ("st", None, ("st-minilm", "text", "encoder", "mean", "none", "")),
    ("clip", "text", ("clip--text", "text", "encoder", "last", "none", "CLIPTextModel")),
    ("clip", "image", ("clip--image", "image", "vision", "cls", "none", "CLIPVisionModel")),
    ("gguf", None, ("smol", "text", "decoder", "last", "gguf", "")),  # a folder: its name
])
def test_the_spec_is_read_from_the_models_config(zoo, model, kind, expected):
    spec = spec_for(str(zoo[model]), kind=kind)
    assert (spec.name, spec.kind, spec.family, spec.pooling, spec.quantization, spec.model_class) == expected
    assert spec.ref == str(zoo[model]) and spec.source == str(zoo[model].resolve())
    assert spec.layers == ("top:6" if spec.family == "decoder" else "even")
    assert spec_for(str(zoo[model]), kind=kind, pooling="mean").pooling == "mean"  # --pooling overrides


def test_quantized_and_unfamiliar_configs(tmp_path, zoo):
    gptq = config_only(tmp_path / "gptq", model_type="llama", quantization_config={"quant_method": "gptq", "bits": 4})
    bnb4 = config_only(tmp_path / "bnb4", model_type="mistral",
                       quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    bnb8 = config_only(tmp_path / "bnb8", model_type="qwen2",
                       quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert [spec_for(str(p)).quantization for p in (gptq, bnb4, bnb8)] == ["gptq", "bnb-4bit", "bnb-8bit"]
    assert {spec_for(str(p)).family for p in (gptq, bnb4, bnb8)} == {"decoder"}
    causal = config_only(tmp_path / "causal", model_type="mystery", architectures=["MysteryForCausalLM"])
    assert (spec_for(str(causal)).family, spec_for(str(causal)).pooling) == ("decoder", "last")
    unknown = config_only(tmp_path / "unknown", model_type="mystery", architectures=["MysteryModel"])
    with pytest.raises(IisanError, match=r"cannot tell what kind of model this is; pass --kind text\|image"):
        spec_for(str(unknown))
    told = spec_for(str(unknown), kind="image")
    assert (told.kind, told.family, told.pooling) == ("image", "vision", "cls")
    assert spec_for(str(unknown), kind="text", family="decoder").pooling == "last"
    awq = config_only(tmp_path / "awq", model_type="llama", quantization_config={"quant_method": "awq"})
    with pytest.raises(IisanError, match="quant_method 'awq' is not supported"):
        spec_for(str(awq))
    convnext = config_only(tmp_path / "convnext", model_type="convnext")
    with pytest.raises(IisanError, match="hierarchical vision backbone"):
        spec_for(str(convnext))
    with pytest.raises(IisanError, match="is a text model; --kind image does not apply"):
        spec_for(str(zoo["bert"]), kind="image")


def test_gguf_checkpoints_are_recognised(tmp_path, zoo):
    """Recognition only: the file holds a header, no tensors (loading a real GGUF is tested with SmolLM2 in
    test_extract_quantized.py)."""
    single = zoo["gguf"] / "smol-q4.gguf"
    by_file = spec_for(str(single))
    assert (by_file.name, by_file.gguf_file, by_file.quantization, by_file.source) == (
        "smol-q4", "smol-q4.gguf", "gguf", str(zoo["gguf"].resolve()))
    two = tmp_path / "two"
    write_gguf(two / "a.Q4.gguf")
    write_gguf(two / "b.Q8.gguf")
    with pytest.raises(IisanError, match=r"several \.gguf files \(a\.Q4\.gguf, b\.Q8\.gguf\): choose one with "
                                         r"--model .*/two/FILE\.gguf"):
        spec_for(str(two))
    assert spec_for(str(two / "b.Q8.gguf")).gguf_file == "b.Q8.gguf"


def test_store_names_are_safe_and_registered_names_stay():
    assert store_name("hf:google-bert/bert-base-uncased") == "google-bert--bert-base-uncased"
    assert store_name("/models/my bert/") == "my-bert"
    assert store_name("./models/smol/SmolLM2-135M.Q4_1.gguf") == "SmolLM2-135M.Q4_1"
    assert store_name("hf:openai/clip-vit-base-patch32", "image") == "openai--clip-vit-base-patch32--image"
    assert store_name("minilm-l6") == "minilm-l6"
    for name in (store_name("hf:a/b"), store_name("/x/y:z")):
        assert not set("@/:") & set(name)
    assert spec_for("minilm-l3").name == "minilm-l3"  # registered names go through spec_for too


def test_error_cases(tmp_path, zoo, toy, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = extract_cli(toy, empty)
    assert result.exit_code == 2 and f"model folder '{empty}' holds neither a config.json nor a .gguf" in result.output
    result = extract_cli(toy, f"{zoo['bert']}@title")
    assert result.exit_code == 2 and "contains '@', which is reserved for MODEL@FIELD" in result.output
    result = extract_cli(toy, zoo["clip"])
    assert result.exit_code == 2 and "has two towers: choose one with --kind text or --kind image" in result.output
    result = extract_cli(toy, tmp_path / "nowhere")
    assert result.exit_code == 2 and "no model folder or .gguf file at" in result.output
    result = extract_cli(toy, zoo["bert"], "--revision", "main")
    assert result.exit_code == 2 and "--revision is for hub ids" in result.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = extract_cli(toy, "hf:nobody/no-such-model-xyz")
    assert result.exit_code == 2
    assert "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" in result.output
    assert "--model PATH (a folder holding config.json and the weights)" in result.output
    assert not (toy / "cache").exists()


def direct_text_states(model, tokenizer, text: str, pooling: str) -> np.ndarray:
    """The slow reference: one item alone, straight through the model, every hidden state pooled."""
    x = tokenizer([text], truncation=True, max_length=30, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**x, output_hidden_states=True).hidden_states
    index = 0 if pooling == "cls" else -1
    return torch.stack([h[0, index] for h in hidden]).numpy()


def test_a_folder_extracts_through_the_cli_and_other_weights_are_refused(tmp_path, toy):
    from transformers import AutoTokenizer, BertModel

    folder = build_tiny_bert(tmp_path / "my-bert")
    result = extract_cli(toy, folder, "--layers", "all")
    assert result.exit_code == 0, result.output
    path = toy / "cache" / "toy" / "my-bert.zarr"
    manifest, states = manifest_and_states(path)
    weights = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert (manifest.model, manifest.model_source, manifest.model_weights_sha256) == ("my-bert", str(folder), weights)
    assert manifest.model_revision.startswith("local:") and manifest.pooling == "cls"
    assert manifest.layers == [0, 1, 2, 3] and states.shape == (N_ITEMS + 1, 4, 32)
    assert verify_store(path) == []
    model, tokenizer = BertModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    texts = [line.split("\t", 1)[1] for line in (toy / "data" / "toy" / "items.tsv").read_text().splitlines()]
    for k in (0, 17):
        np.testing.assert_allclose(states[k + 1], direct_text_states(model, tokenizer, clean_text(texts[k], "clean"),
                                                                     "cls"), atol=1e-5)
    # Training finds the store from the same ref; an encoder, so no standardisation.
    found, name = _find_store(SimpleNamespace(cache=str(toy / "cache")), "toy", SlotSource.parse("text", str(folder)))
    assert (found, name) == (path, "my-bert") and not _is_decoder(str(folder), manifest)
    # Same config, same file sizes, other weights: only the weight hash tells; the store is refused.
    torch.manual_seed(1)
    BertModel(model.config).save_pretrained(folder)
    again = extract_cli(toy, folder, "--layers", "all")
    assert again.exit_code == 2 and "cannot be resumed" in again.output
    assert f"model_weights_sha256: store has '{weights}'" in again.output
    assert "model_revision" not in again.output  # the folder hash (names and sizes) did not change


def test_clip_towers_extract_to_two_stores(zoo, toy):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPTextModel, CLIPVisionModel

    from iisan.data.dataset import load_dataset
    from iisan.data.images import load_item_images

    for kind in ("text", "image"):
        result = extract_cli(toy, zoo["clip"], "--kind", kind)
        assert result.exit_code == 0, result.output
    text_manifest, text_states = manifest_and_states(toy / "cache" / "toy" / "clip--text.zarr")
    image_manifest, image_states = manifest_and_states(toy / "cache" / "toy" / "clip--image.zarr")
    assert (text_manifest.model, text_manifest.pooling, text_manifest.layers) == ("clip--text", "last", [0, 2])
    assert (image_manifest.model, image_manifest.pooling, image_manifest.layers) == ("clip--image", "cls", [0, 1, 3])
    assert text_manifest.model_weights_sha256 == image_manifest.model_weights_sha256  # one checkpoint
    texts = load_dataset("toy").field_texts("title")
    text_model = CLIPTextModel.from_pretrained(zoo["clip"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo["clip"])
    for k in (0, 5):
        np.testing.assert_allclose(text_states[k + 1], direct_text_states(text_model, tokenizer, texts[k], "last")[
            [0, 2]], atol=1e-5)
    vision = CLIPVisionModel.from_pretrained(zoo["clip"]).eval()
    processor = AutoImageProcessor.from_pretrained(zoo["clip"])
    dataset = load_dataset("toy")
    for k in (0, 1):  # with and without an image
        images, _, _ = load_item_images(dataset.images, [dataset.items.ids[k]])
        with torch.inference_mode():
            hidden = vision(**processor(images=images, return_tensors="pt"), output_hidden_states=True).hidden_states
        np.testing.assert_allclose(image_states[k + 1], torch.stack([hidden[i][0, 0] for i in (0, 1, 3)]).numpy(),
                                   atol=1e-5)
    cfg = SimpleNamespace(cache=str(toy / "cache"))
    assert _find_store(cfg, "toy", SlotSource.parse("image", str(zoo["clip"])))[1] == "clip--image"
    assert _find_store(cfg, "toy", SlotSource.parse("text", str(zoo["clip"]) + "@title"))[1] == "clip--text"
    with pytest.raises(IisanError, match=r"no cache for .*clip@year on toy .* --field year"):
        _find_store(cfg, "toy", SlotSource.parse("text", str(zoo["clip"]) + "@year"))


def test_decoder_refs_are_standardised_by_auto(zoo):
    from iisan.train.data import standardize_mode

    manifest = SimpleNamespace(text_field="title", pooling="mean")  # the spec decides, not the pooling
    assert standardize_mode("auto", str(zoo["llama"]), manifest) == "dim"
    assert standardize_mode("auto", str(zoo["st"]), manifest) == "off"
    gone = SimpleNamespace(text_field="title", pooling="last")  # the model is no longer at hand
    assert standardize_mode("auto", "/nowhere/llama", gone) == "dim"


def test_dry_run_prints_the_figures_and_writes_nothing(zoo, toy):
    rows = N_ITEMS + 1
    result = extract_cli(toy, zoo["bert"], "--dry-run", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "dry run: nothing written" in out and f"{N_ITEMS} items -> {rows} rows" in out
    assert "3 of 4 hidden states kept: [0, 1, 3] (rule even)" in out and "hidden size  32" in out
    assert f"kept layers  {rows * 3 * 32 * 2:,} bytes" in out and f"all layers   {rows * 4 * 32 * 2:,} bytes" in out
    assert "final        0 bytes" in out  # BERT's output is its last hidden state
    assert "an estimate from 40 items timed" in out and "on cpu (float32), batch 64" in out
    assert "does not exist: would be created" in out
    vit = extract_cli(toy, zoo["vit"], "--dry-run", "--batch-size", "8")
    assert vit.exit_code == 0, vit.output
    assert f"final        {rows * 32 * 4:,} bytes" in vit.output  # ViT's final LayerNorm: stored (float32 here)
    assert "an estimate from 16 items timed" in vit.output and "on cpu (float32), batch 8" in vit.output
    assert not (toy / "cache").exists()
    # With a store there: what a run would do with it.
    assert extract_cli(toy, zoo["bert"]).exit_code == 0
    done = extract_cli(toy, zoo["bert"], "--dry-run")
    assert "exists and is complete: a run would encode nothing" in done.output and "for 0 items" in done.output
    other = extract_cli(toy, zoo["bert"], "--dry-run", "--dtype", "float16")
    assert "exists, written for something else: a run would refuse it (storage_dtype: store has 'float32'" in \
        other.output


def test_models_show_prints_the_resolved_spec(zoo):
    result = cli("models", "show", str(zoo["st"]))
    assert result.exit_code == 0, result.output
    assert "pooling        'mean'" in result.output and "store name     'st-minilm'" in result.output
    assert "hidden states  4 (embeddings + 3 blocks), width 32; rule even keeps [0, 1, 3]" in result.output
    clip = cli("models", "show", str(zoo["clip"]), "--kind", "image")
    assert "model_class    'CLIPVisionModel'" in clip.output and "hidden states  4" in clip.output


def test_a_hub_id_from_the_hf_cache(tmp_path, zoo, toy, monkeypatch):
    """hf:ORG/NAME offline, from a Hugging Face cache laid out as huggingface_hub writes it."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    shutil.copytree(zoo["bert"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: without this, a run started online would try the
    # network (and back off for minutes) before falling back to the cache.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = extract_cli(toy, "hf:acme/tiny-bert")
    assert result.exit_code == 0, result.output
    manifest, _ = manifest_and_states(toy / "cache" / "toy" / "acme--tiny-bert.zarr")
    weights = hashlib.sha256((zoo["bert"] / "model.safetensors").read_bytes()).hexdigest()
    assert (manifest.model, manifest.model_source, manifest.model_revision, manifest.model_weights_sha256) == (
        "acme--tiny-bert", "acme/tiny-bert", commit, weights)
    found, name = _find_store(SimpleNamespace(cache=str(toy / "cache")), "toy",
                              SlotSource.parse("text", "hf:acme/tiny-bert@title"))
    assert name == "acme--tiny-bert" and found.name == "acme--tiny-bert.zarr"


def test_a_store_written_before_the_weight_hash_still_resumes(zoo, toy):
    from iisan.cache_store.backends import backend_for

    assert extract_cli(toy, zoo["bert"]).exit_code == 0
    path = toy / "cache" / "toy" / "bert.zarr"
    backend = backend_for(path).open(path, writable=True)
    raw = dict(backend.group.attrs["iisan"])
    del raw["model_weights_sha256"]  # as stores written before the field existed
    backend.group.attrs["iisan"] = raw
    backend.close()
    assert manifest_and_states(path)[0].model_weights_sha256 == ""
    again = extract_cli(toy, zoo["bert"])
    assert again.exit_code == 0 and "nothing to encode: 3 chunk(s) already done; store complete" in again.output
    assert verify_store(path) == []
