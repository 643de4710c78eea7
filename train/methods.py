"""The training methods `--method` selects, each one registered object (peft's `register_peft_method` style).

A method carries everything that distinguishes it: its presets (applied over the config defaults and under a
pipeline's presets and the command line), where its item encoder reads from (`ItemSource`), what of the
backbones trains (`Tuning`, end-to-end methods), and `build`, which makes its item encoder from what the
recipe loaded for it. Optimizer parameter groups come from the modules the encoder built (their
`lr_groups(cfg)`), never from attribute-name prefixes. Adding a method is one `register_method(Method(...))`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Literal

from iisan.errors import RegistryError

if TYPE_CHECKING:
    from torch import nn

    from iisan.train.recipe import ItemContext


class ItemSource(str, Enum):
    """Where a method's item embeddings come from."""

    CACHED = "cached"            # per-layer states read from the stage-1 cache; no backbone runs in training
    END_TO_END = "end-to-end"    # the backbones run on raw items (tokens, pixels) at every step
    ID = "id"                    # an ID embedding table, no content


class Tuning(str, Enum):
    """What of the backbones an end-to-end method trains (train/tuning.py)."""

    NONE = "none"        # frozen (uncached IISAN)
    ALL = "all"          # full fine-tuning
    ADAPTER = "adapter"  # Houlsby adapters
    LORA = "lora"        # LoRA on query / value
    BIAS = "bias"        # BitFit


@dataclass(frozen=True)
class Method:
    name: str
    items: ItemSource
    build: Callable[["ItemContext"], "nn.Module"] = field(repr=False)
    help: str = ""
    tunes: Tuning = Tuning.NONE
    # Cached methods: `layers` reads the per-layer states; `final` the model's final output (after its final
    # norm, docs/method.md §7), as one state per item.
    reads: Literal["layers", "final"] = "layers"
    presets: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_content(self) -> bool:
        return self.items is not ItemSource.ID


METHODS: dict[str, Method] = {}


def register_method(method: Method, replace: bool = False) -> Method:
    """Register `method` under its name; a name registered twice is an error unless `replace`."""
    if method.name in METHODS and not replace:
        raise RegistryError(f"method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def method(name: str) -> Method:
    if name not in METHODS:
        raise RegistryError(f"method '{name}' not one of {', '.join(METHODS)}")
    return METHODS[name]


def methods_from_list(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Comma-separated (or listed) method names, each checked against the registry."""
    chosen = tuple(n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip())
    unknown = [n for n in chosen if n not in METHODS]
    if unknown:
        raise RegistryError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return chosen


# --- the built-in methods -------------------------------------------------------------------------------

def _iisan(ctx: "ItemContext") -> "nn.Module":
    from iisan.train.model import IISANItems

    return IISANItems(ctx.cached_states(), ctx.san_config())


def _hybrid(ctx: "ItemContext") -> "nn.Module":
    import torch

    from iisan.train.model import HybridItems

    seen = torch.from_numpy(ctx.split.train_counts > 0)
    return HybridItems(ctx.cached_states(), ctx.san_config(), seen, ctx.cfg.id_dropout, ctx.cfg.id_init,
                       ctx.cfg.content_loss, ctx.cfg.cold_merge, ctx.cfg.id_dropout_unit)


def _frozen(ctx: "ItemContext") -> "nn.Module":
    from iisan.train.model import FrozenItems

    return FrozenItems(ctx.cached_states(), ctx.cfg.embedding_dim)


def _ids(ctx: "ItemContext") -> "nn.Module":
    from iisan.train.model import IDItems

    return IDItems(ctx.split.n_items, ctx.cfg.embedding_dim)


def _uncached(ctx: "ItemContext") -> "nn.Module":
    from iisan.train.end_to_end import UncachedIISANItems

    return UncachedIISANItems(ctx.raw_slots(), ctx.san_config())


def _end_to_end(ctx: "ItemContext") -> "nn.Module":
    from iisan.train.end_to_end import EndToEndItems

    return EndToEndItems(ctx.raw_slots(), ctx.cfg.embedding_dim)


# iisan's defaults, chosen on valid HR@10 across ml-100k title, ml-100k title + poster and Scientific title
# (issue 33, plans/defaults.yaml; docs/method.md §3.2): the papers' dot product at lr 2e-4 / 1e-4 before.
IISAN_PRESETS = {"score": "cosine", "temperature": 0.1, "lr": 8e-4, "lr_san": 4e-4}

# docs/method.md §7 gives FFT's (BERT 5e-5, ViT 1e-4, rest 1e-4, batch 32) and the Houlsby adapter's
# (adapters 4e-4, rest 2e-4, batch 32) settings; it is silent on LoRA and BitFit, which take the adapter's.
_PEFT_PRESETS = {"batch_size": 32, "lr": 2e-4, "lr_backbone_text": 4e-4, "lr_backbone_image": 4e-4}

for _m in (
    Method("iisan", ItemSource.CACHED, _iisan,
           "IISAN / IISAN-Versa side networks on cached states (the product's method); cosine score at "
           "temperature 0.1, lr 8e-4 / lr_san 4e-4 (chosen across three settings, docs/method.md §3.2)",
           presets=dict(IISAN_PRESETS)),
    Method("iisan-hybrid", ItemSource.CACHED, _hybrid,
           "IISAN's content embedding plus a learned item-ID embedding with ID dropout; items never seen in "
           "training get their content alone (docs/method.md §7.1)", presets={"lr_id": 1e-3}),
    Method("frozen", ItemSource.CACHED, _frozen, "frozen backbone: each modality's final output -> "
           "GELU(Linear(D -> d)), fused (docs/method.md §7)", reads="final"),
    Method("sasrec-id", ItemSource.ID, _ids, "SASRec with ID embeddings, no content (lr 1e-3 as SASRec's "
           "paper: docs/method.md §7)", presets={"lr": 1e-3}),
    Method("iisan-uncached", ItemSource.END_TO_END, _uncached, "the same side networks, frozen backbones run "
           "every step in inference mode (docs/method.md §5.8, fixed: eval mode); iisan's presets, so it is the "
           "same model", presets=dict(IISAN_PRESETS)),
    Method("fft", ItemSource.END_TO_END, _end_to_end, "full fine-tuning of the backbones end to end",
           tunes=Tuning.ALL, presets={"batch_size": 32, "lr": 1e-4, "lr_backbone_text": 5e-5,
                                      "lr_backbone_image": 1e-4}),
    Method("adapter", ItemSource.END_TO_END, _end_to_end, "Houlsby adapters after the attention-output and "
           "FFN-output projections", tunes=Tuning.ADAPTER, presets=dict(_PEFT_PRESETS)),
    Method("lora", ItemSource.END_TO_END, _end_to_end, "LoRA on the query and value projections (peft, "
           "wrapping the pretrained layers)", tunes=Tuning.LORA, presets=dict(_PEFT_PRESETS)),
    Method("bitfit", ItemSource.END_TO_END, _end_to_end, "BitFit: only the backbones' biases (and the heads) "
           "train", tunes=Tuning.BIAS, presets=dict(_PEFT_PRESETS)),
):
    register_method(_m)

# What `iisan bench` compares by default, in table order (the papers' Figure 5 methods).
BENCH_METHODS = ("fft", "adapter", "lora", "bitfit", "iisan-uncached", "iisan")
