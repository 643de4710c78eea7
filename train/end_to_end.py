"""Item encoders that run the backbones on raw items at every step (the end-to-end methods of
train/methods.py): uncached IISAN (frozen backbones, the same side network as the cached method) and the
end-to-end baselines FFT / Adapter / LoRA / BitFit (docs/method.md §7).

Raw items are fed exactly as stage 1 feeds them (`extract.encode.ChunkEncoder.inputs`: the same text
cleaning, tokenizer, truncation, image processor and grey placeholder for a missing image), so uncached and
cached IISAN see the same numbers. Only the unique items of a batch run through the backbones (the reference
code also encodes padding and duplicate slots, docs/method.md §10); item index 0 (padding) is never encoded and gets
all-zero states, as row 0 of a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from iisan.data.dataset import Dataset
from iisan.data.protocol import SplitData
from iisan.errors import IisanError
from iisan.extract.encode import ChunkEncoder
from iisan.extract.models import Backbone
from iisan.extract.pooling import pool, pool_layers
from iisan.train.model import LastStateHeads
from iisan.train.san import SANConfig, SideNetwork, Slot

if TYPE_CHECKING:
    from iisan.train.data import SlotSource


@dataclass
class RawSlot:
    """One modality slot fed from raw items: the backbone, which text field, which hidden states to pool."""

    slot: str               # a Slot value: text, image or text2
    source: SlotSource      # the model and, for text, the field
    backbone: Backbone
    layers: list[int]       # hidden states kept (uncached IISAN); the embedded baselines use the last output
    encoder: ChunkEncoder
    positions: list[int]    # item index -> row of the items file (index 0, padding: -1)

    @classmethod
    def build(cls, slot: str, source: SlotSource, backbone: Backbone, dataset: Dataset, split: SplitData,
              layers: list[int], text_clean: str) -> "RawSlot":
        row = {item_id: r for r, item_id in enumerate(dataset.items.ids)}
        positions = [-1] + [row[item_id] for item_id in split.item_ids]
        encoder = ChunkEncoder(backbone, dataset, layers, batch_size=1, field=source.field,
                               text_clean=text_clean)
        return cls(slot, source, backbone, layers, encoder, positions)

    def inputs(self, index: list[int]) -> dict[str, torch.Tensor]:
        """Model inputs on the backbone's device for item indices (none of them 0)."""
        inputs, _ = self.encoder.inputs([self.positions[i] for i in index])
        self.encoder.problems.clear()  # missing images were reported by `iisan data stats`; not per step
        moved = {k: v.to(self.backbone.device, non_blocking=True) for k, v in inputs.items()}
        if "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(next(self.backbone.model.parameters()).dtype)
        return moved

    @property
    def dim(self) -> int:
        return self.backbone.info.hidden_size


def _scatter_rows(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Rows for every index, `values` filling the non-zero ones in order, zeros for index 0."""
    out = values.new_zeros((len(index), *values.shape[1:]))
    out[index != 0] = values
    return out


class BackboneItems(nn.Module):
    """Base: the backbones as submodules (`backbones.<slot>`, so that checkpoints can tell them apart) and the
    raw-item feeds."""

    table_batch_size = 128  # items per forward when the whole item table is encoded for evaluation

    def __init__(self, slots: dict[str, RawSlot]):
        super().__init__()
        self.feeds = slots
        self.backbones = nn.ModuleDict({slot: feed.backbone.model for slot, feed in slots.items()})

    def _real(self, index: torch.Tensor) -> list[int]:
        return [int(i) for i in index.tolist() if i != 0]

    def lr_groups(self, cfg) -> list[tuple[list[nn.Parameter], float]]:
        """The trainable part of an image backbone at lr_backbone_image, of a text backbone (text or text2)
        at lr_backbone_text."""
        return [([p for p in backbone.parameters() if p.requires_grad],
                 cfg.lr_backbone_image if slot == Slot.IMAGE.value else cfg.lr_backbone_text)
                for slot, backbone in self.backbones.items()]


class UncachedIISANItems(BackboneItems):
    """IISAN with the frozen backbones run at every step (docs/method.md §5.8), in eval mode and without gradients:
    the same side network as `IISANItems`, fed the same pooled states a cache would hold."""

    def __init__(self, slots: dict[str, RawSlot], cfg: SANConfig):
        super().__init__(slots)
        self.side = SideNetwork({s: len(f.layers) for s, f in slots.items()}, {s: f.dim for s, f in slots.items()},
                                cfg)

    def lr_groups(self, cfg) -> list[tuple[list[nn.Parameter], float]]:
        return super().lr_groups(cfg) + [(self.side.san_parameters(), cfg.lr_san)]

    def train(self, mode: bool = True) -> "UncachedIISANItems":
        super().train(mode)
        self.backbones.eval()  # frozen states, no dropout (the reference code left BERT in train mode)
        return self

    def states(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        real = self._real(index)
        out = {}
        for slot, feed in self.feeds.items():
            if not real:
                out[slot] = torch.zeros(len(index), len(feed.layers), feed.dim, device=index.device)
                continue
            inputs = feed.inputs(real)
            with torch.no_grad():
                hidden = feed.backbone.model(**inputs, output_hidden_states=True).hidden_states
                pooled = pool_layers(hidden, inputs.get("attention_mask"), feed.backbone.spec.pooling, feed.layers)
            out[slot] = _scatter_rows(index, pooled.to(index.device))
        return out

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.side(self.states(index))


class EndToEndItems(BackboneItems):
    """docs/method.md §7's shared item encoder for the end-to-end baselines: each backbone's final output, pooled as
    the model's registry entry says (CLS for ViT / DINOv2, after the final LayerNorm), through
    GELU(Linear(D -> d)), fused by Linear. Which backbone weights train is set beforehand
    (train/tuning.py); gradients flow through the backbones."""

    def __init__(self, slots: dict[str, RawSlot], dim: int):
        super().__init__(slots)
        self.head = LastStateHeads({s: f.dim for s, f in slots.items()}, dim)

    def last_states(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        real = self._real(index)
        out = {}
        for slot, feed in self.feeds.items():
            if not real:
                out[slot] = torch.zeros(len(index), feed.dim, device=index.device)
                continue
            inputs = feed.inputs(real)
            hidden = feed.backbone.model(**inputs).last_hidden_state
            pooled = pool(hidden, inputs.get("attention_mask"), feed.backbone.spec.pooling)
            out[slot] = _scatter_rows(index, pooled.to(index.device))
        return out

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.head(self.last_states(index))


def check_raw_slot(slot: str, source: SlotSource, dataset: Dataset, kind: str) -> None:
    if kind == "image" and not dataset.images.paths:
        raise IisanError(f"dataset '{dataset.name}' has no images, but the pipeline feeds the {slot} slot with "
                         f"the image model {source}; use a text pipeline (--pipeline text-only)")


def check_end_to_end(cfg, method, dataset: Dataset) -> None:
    """What can be refused before any backbone loads: an image model on a dataset without images, a quantized
    backbone whose weights the method would train, uncached IISAN asked to standardise."""
    from iisan.extract.models import model_spec
    from iisan.train.data import slot_sources
    from iisan.train.methods import Tuning

    for slot, source in slot_sources(cfg).items():
        spec = model_spec(source.model)
        check_raw_slot(slot, source, dataset, spec.kind)
        if method.tunes in (Tuning.ALL, Tuning.BIAS) and spec.quantization in ("gptq", "bnb-8bit", "bnb-4bit"):
            raise IisanError(f"--method {cfg.method} trains the weights of {spec.name}, which are quantized "
                             f"({spec.quantization}); use --method lora or adapter, or iisan")
        standardize = cfg.standardize in ("on", "dim", "layer") or (cfg.standardize == "auto"
                                                                     and spec.family == "decoder")
        if method.tunes is Tuning.NONE and standardize:
            raise IisanError(f"{cfg.method} does not standardise states ({spec.name}): the statistics need a pass "
                             f"over every item, which is what the cache is for; use --standardize off or --method iisan")


def load_raw_slots(cfg, method, dataset: Dataset, split: SplitData, device: torch.device) -> dict[str, RawSlot]:
    """Load each slot's backbone afresh (once per seed, after seeding), made trainable as the method says."""
    from iisan.extract.layers import select_layers
    from iisan.extract.models import describe_backbone, load_backbone, model_spec
    from iisan.train.data import layer_rule, slot_sources
    from iisan.train.methods import Tuning
    from iisan.train.tuning import make_trainable

    raw = {}
    for slot, source in slot_sources(cfg).items():
        spec = model_spec(source.model)
        info = describe_backbone(spec, fetch=True)
        rule = layer_rule(cfg, slot) or spec.layers
        trainable = method.tunes is not Tuning.NONE
        # Trained weights stay fp32 (autocast runs fp16 on GPU); a frozen backbone loads as for extraction.
        backbone = load_backbone(info, device, dtype=torch.float32 if trainable and spec.quantization == "none" else None)
        make_trainable(backbone.model, method.tunes, cfg)
        raw[slot] = RawSlot.build(slot, source, backbone, dataset, split, select_layers(rule, info.n_hidden_states),
                                  cfg.text_clean)
    return raw
