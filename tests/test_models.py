"""The model registry: every registered model parses, loading plans per device, how-to-get messages."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from iisan.cli import main as iisan_cli
from iisan.errors import RegistryError
from iisan.extract.models import ModelError, describe_backbone, loading_plan, model_names, model_spec, resolve_source

from tiny_models import write_registry

REGISTERED = {"bert-base", "bert-large", "vit-base", "vit-large", "llama3-8b", "llama3-70b-gptq", "minilm-l3",
              "dinov2-small", "minilm-l6", "smollm2-135m", "mpnet-base"}


def test_every_required_model_is_registered():
    assert REGISTERED <= set(model_names())
    assert model_spec("minilm-l6").pooling == "mean" and model_spec("mpnet-base").pooling == "mean"
    assert model_spec("minilm-l3").pooling == "mean"
    assert (model_spec("bert-base").pooling, model_spec("vit-base").pooling) == ("cls", "cls")
    gptq = model_spec("llama3-70b-gptq")
    assert (gptq.family, gptq.quantization, gptq.pooling, gptq.layers) == ("decoder", "gptq", "last", "top:6")
    assert model_spec("smollm2-135m").quantization == "gguf"
    assert model_spec("dinov2-small").layers == "even" and model_spec("dinov2-small").kind == "image"
    result = CliRunner().invoke(iisan_cli, ["models", "list"])
    assert result.exit_code == 0
    assert {line.split()[0] for line in result.output.splitlines()} >= REGISTERED


@pytest.mark.parametrize("model, device, expected", [
    ("bert-base", "cpu", {"dtype": torch.float32}),
    ("bert-base", "cuda", {"dtype": torch.float16, "device_map": "sequential"}),
    ("bert-base", "cuda:1", {"dtype": torch.float16, "device_map": {"": 1}}),
    ("llama3-8b", "cuda", {"dtype": torch.bfloat16, "device_map": "sequential"}),
    ("llama3-70b-gptq", "cpu", {"dtype": torch.float32, "device_map": "cpu"}),
    ("llama3-70b-gptq", "cuda:0", {"dtype": torch.float16, "device_map": {"": 0}}),
    ("smollm2-135m", "cpu", {"dtype": torch.float32, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}),
])
def test_loading_plan(model, device, expected):
    assert loading_plan(model_spec(model), torch.device(device)) == expected


@pytest.mark.parametrize("quantization, device", [("bnb-8bit", "cpu"), ("bnb-4bit", "cuda")])
def test_loading_plan_bitsandbytes(tmp_path, monkeypatch, quantization, device):
    registry = write_registry(tmp_path / "p.yaml", {"q": {"source": "x/y", "kind": "text", "family": "decoder",
                                                          "quantization": quantization}})
    monkeypatch.setenv("IISAN_PIPELINES", str(registry))
    plan = loading_plan(model_spec("q"), torch.device(device))
    config = plan.pop("quantization_config")
    if quantization == "bnb-8bit":
        assert config.load_in_8bit and plan == {"dtype": torch.float32, "device_map": "cpu"}
    else:
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_compute_dtype == torch.float16
        assert plan == {"dtype": torch.float16, "device_map": "sequential"}


def test_how_to_get_a_missing_model(tmp_path, monkeypatch):
    registry = write_registry(tmp_path / "p.yaml", {
        "ghost": {"source": "nobody/ghost-model", "kind": "text", "family": "encoder"},
        "wheeled": {"wheel": "iisan-no-such-wheel==1.0", "wheel_path": "x/model", "kind": "text", "family": "encoder"},
        "bad": {"source": "x", "kind": "sound", "family": "encoder"},
    })
    monkeypatch.setenv("IISAN_PIPELINES", str(registry))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"'nobody/ghost-model' is not a local folder .* HF_HUB_OFFLINE forbids"):
        resolve_source(model_spec("ghost"))
    with pytest.raises(ModelError, match=r"carried by the wheel iisan-no-such-wheel==1.0.*run `iisan models fetch "
                                         r"wheeled`"):
        resolve_source(model_spec("wheeled"))
    with pytest.raises(RegistryError, match=r"p.yaml:\d+: models.bad.kind: Input should be 'text' or 'image'"):
        model_spec("bad")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub cannot answer
    with pytest.raises(ModelError, match=r"neither a local folder .* nor reachable on the Hugging Face hub"):
        describe_backbone(model_spec("ghost"), fetch=False)
