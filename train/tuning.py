"""How an end-to-end method makes a pretrained backbone trainable (docs/method.md §7), in place.

- `all` (FFT): every weight trains.
- `bias` (BitFit): every bias of the backbone trains, nothing else.
- `adapter` (Houlsby): a bottleneck D -> r -> D with GELU and a residual after the attention-output
  projection and after the FFN-output projection of every layer (2 per layer; 48 for BERT-base + ViT-base).
  Weights N(0, 0.01²) and zero biases, as the side network's blocks, so that the adapted backbone starts
  close to the pretrained one and every adapter weight receives a gradient from the first step.
- `lora`: LoRA (peft) on the query and value projections of every layer, wrapping the pretrained layers,
  so the pretrained weights are kept (the reference code replaced them with fresh ones, docs/method.md §10).
- `none`: frozen (the uncached IISAN baseline).

Target layers are found by module-name suffix, which covers BERT / MiniLM / RoBERTa, ViT / DINOv2, MPNet,
CLIP and Llama-style decoders; a backbone with no match stops with a message naming it.
"""

from __future__ import annotations

import torch
from torch import nn

from iisan.errors import IisanError
from iisan.train.methods import Tuning
from iisan.train.san import SANBlock

# Attention-output and FFN-output projections: BERT / ViT (attention.output.dense, output.dense), DINOv2
# (mlp.fc2, mlp.weights_out), MPNet (attn.o), CLIP (out_proj, fc2), Llama / Mistral / Gemma (o_proj, down_proj).
ADAPTER_TARGETS = ("output.dense", "attn.o", "out_proj", "o_proj", "fc2", "weights_out", "down_proj")
# Query and value projections: BERT / ViT / DINOv2 (query, value), MPNet (attn.q, attn.v), Llama / CLIP.
LORA_TARGETS = ("query", "value", "attn.q", "attn.v", "q_proj", "v_proj")


class HoulsbyAdapter(SANBlock):
    """x + W_up GELU(W_down x + b_down) + b_up: a SAN block with GELU, initialised the same way."""

    def __init__(self, dim: int, bottleneck: int):
        super().__init__(dim, bottleneck, activation=nn.functional.gelu)


class AdaptedLinear(nn.Module):
    """A pretrained projection followed by its adapter (the projection's own weights stay as loaded)."""

    def __init__(self, linear: nn.Linear, bottleneck: int):
        super().__init__()
        self.linear = linear
        self.adapter = HoulsbyAdapter(linear.out_features, bottleneck).to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(x))


def _in_layers(name: str) -> bool:
    # Only the transformer blocks (encoder.layer.N..., layers.N...), never a pooler or an embedding projection.
    parts = name.split(".")
    return any(p in ("layer", "layers", "h", "blocks") and i + 1 < len(parts) and parts[i + 1].isdigit()
               for i, p in enumerate(parts))


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def target_names(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the nn.Linear modules inside the transformer blocks whose name ends with one of `suffixes`."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and _in_layers(name) and _matches(name, suffixes)]


def _no_targets(model: nn.Module, what: str, suffixes: tuple[str, ...]) -> IisanError:
    return IisanError(f"{type(model).__name__}: no {what} found (looked for Linear layers named "
                      f"{', '.join(suffixes)} inside its blocks); this architecture needs an entry in "
                      f"train/tuning.py")


def add_adapters(model: nn.Module, bottleneck: int) -> list[str]:
    """Insert a Houlsby adapter after each attention-output and FFN-output projection; returns their names."""
    names = target_names(model, ADAPTER_TARGETS)
    if not names:
        raise _no_targets(model, "attention-output / FFN-output projections", ADAPTER_TARGETS)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, AdaptedLinear(getattr(parent, child), bottleneck))
    return names


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[str]:
    """Wrap the query and value projections with LoRA (peft): W x + (alpha / r) B A x, B = 0 at start."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_names(model, LORA_TARGETS)
    if not names:
        raise _no_targets(model, "query / value projections", LORA_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names)
    inject_adapter_in_model(config, model)
    return names


def _tune_all(model: nn.Module, cfg) -> None:
    model.requires_grad_(True)


def _tune_bias(model: nn.Module, cfg) -> None:
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    if not biases:
        raise IisanError(f"{type(model).__name__} has no biases: BitFit has nothing to train")
    for p in biases:
        p.requires_grad_(True)


def _tune_adapter(model: nn.Module, cfg) -> None:
    add_adapters(model, cfg.adapter_bottleneck)
    for name, p in model.named_parameters():
        p.requires_grad_(".adapter." in name)


def _tune_lora(model: nn.Module, cfg) -> None:
    add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


# What each `Tuning` of train/methods.py does to a backbone (after every weight has been frozen).
TUNINGS = {Tuning.ALL: _tune_all, Tuning.BIAS: _tune_bias, Tuning.ADAPTER: _tune_adapter, Tuning.LORA: _tune_lora}


def make_trainable(model: nn.Module, tunes: Tuning, cfg) -> nn.Module:
    """Set which backbone parameters train (`tunes`), adding adapters or LoRA first; `cfg` (a TrainConfig)
    gives the adapter width and the LoRA rank and alpha."""
    model.requires_grad_(False)
    tunes = Tuning(tunes)
    if tunes is Tuning.NONE:
        return model
    if getattr(model, "pooler", None) is not None:
        # The item encoder reads the last hidden state, never the pooler (BERT's tanh head): drop its unused
        # weights rather than count them as trained.
        model.pooler = None
    TUNINGS[tunes](model, cfg)
    for name, p in model.named_parameters():
        if name.endswith("mask_token"):  # ViT / DINOv2 masked-image-modelling token, unused on whole images
            p.requires_grad_(False)
    return model
