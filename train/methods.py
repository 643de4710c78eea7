"""The training methods `--method` selects, registered by name (peft style).

Each method says where its item embeddings come from:
- `cached`: per-layer states read from the stage-1 cache (no backbone runs while training);
- `backbone`: the backbones run on raw items (text tokens, image pixels) at every step;
- `id`: ID embeddings, no content.
and carries its presets (SPEC §7 / §8), applied over the config defaults and under a pipeline's presets and
the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    items: str = field(metadata={"help": "cached | backbone | id"})
    help: str = ""
    tunes: str = field(default="none", metadata={
        "help": "what of the backbones trains: none | all (FFT) | adapter | lora | bias"})
    presets: dict[str, Any] = field(default_factory=dict)


# SPEC §7 gives FFT's (BERT 5e-5, ViT 1e-4, rest 1e-4, batch 32) and the Houlsby adapter's (adapters 4e-4,
# rest 2e-4, batch 32) settings; it is silent on LoRA and BitFit, which take the adapter's.
_PEFT_PRESETS = {"batch_size": 32, "lr": 2e-4, "lr_backbone_text": 4e-4, "lr_backbone_image": 4e-4}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("iisan", "cached", "IISAN / IISAN-Versa side networks on cached states (the product's method)"),
    Method("frozen", "cached", "frozen backbone: last cached layer -> GELU(Linear(D -> d)), fused (SPEC §7)"),
    Method("sasrec-id", "id", "SASRec with ID embeddings, no content"),
    Method("iisan-uncached", "backbone", "the same side networks, frozen backbones run every step in "
           "inference mode (SPEC §5.8, fixed: eval mode)"),
    Method("fft", "backbone", "full fine-tuning of the backbones end to end", tunes="all",
           presets={"batch_size": 32, "lr": 1e-4, "lr_backbone_text": 5e-5, "lr_backbone_image": 1e-4}),
    Method("adapter", "backbone", "Houlsby adapters after the attention-output and FFN-output projections",
           tunes="adapter", presets=dict(_PEFT_PRESETS)),
    Method("lora", "backbone", "LoRA on the query and value projections (peft, wrapping the pretrained layers)",
           tunes="lora", presets=dict(_PEFT_PRESETS)),
    Method("bitfit", "backbone", "BitFit: only the backbones' biases (and the heads) train", tunes="bias",
           presets=dict(_PEFT_PRESETS)),
)}

# What `iisan bench` compares by default, in table order (the papers' Figure 5 methods).
BENCH_METHODS = ("fft", "adapter", "lora", "bitfit", "iisan-uncached", "iisan")


def method(name: str) -> Method:
    from iisan.errors import RegistryError

    if name not in METHODS:
        raise RegistryError(f"method '{name}' not one of {', '.join(METHODS)}")
    return METHODS[name]
