"""Turning items into pooled per-layer states: text cleaning, tokenization / image processing, the
forward pass, pooling. `ChunkEncoder.encode(positions)` is what extraction (and its benchmark) runs per
chunk; batches never straddle chunks, so a resumed run pads exactly like an uninterrupted one."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iisan.data.dataset import Dataset
from iisan.data.images import load_item_images
from iisan.extract.models import Backbone
from iisan.extract.pooling import pool_layers

TEXT_CLEAN = ("clean", "raw")


def clean_text(text: str, mode: str) -> str:
    """`clean`: HTML entities unescaped and surrounding space stripped (default); `raw`: as in the file,
    which is what the reference code encodes."""
    if mode == "raw":
        return text
    if mode == "clean":
        return html.unescape(text).strip()
    raise ValueError(f"text_clean '{mode}' not one of {', '.join(TEXT_CLEAN)}")


@dataclass
class ChunkEncoder:
    backbone: Backbone
    dataset: Dataset
    layers: list[int]
    batch_size: int
    field: str | None = None        # text field (text models)
    text_clean: str = "clean"

    def __post_init__(self) -> None:
        if self.backbone.spec.kind == "text":
            raw = self.dataset.field_texts(self.field or "title")
            self.texts = [clean_text(t, self.text_clean) for t in raw]
        else:
            self.texts = None
        self.problems: list[str] = []  # missing or corrupt images, empty texts

    def inputs(self, positions: range | list[int]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Model inputs for a batch of item positions, and each item's `missing` flag."""
        spec, pre = self.backbone.spec, self.backbone.preprocessor
        if self.texts is not None:
            texts = [self.texts[p] for p in positions]
            missing = [not t for t in texts]
            for p, m in zip(positions, missing):
                if m:
                    self.problems.append(f"item '{self.dataset.items.ids[p]}': empty text")
            # An empty text would give no token at all to a tokenizer that adds none (decoder LLMs): encode
            # it as one special token instead; the item is flagged missing either way.
            stand_in = pre.unk_token or pre.eos_token or pre.bos_token or "?"
            texts = [t if t else stand_in for t in texts]
            encoded = pre(texts, padding=True, truncation=True, max_length=spec.max_tokens, return_tensors="pt",
                          return_attention_mask=True)
            return dict(encoded), missing
        ids = [self.dataset.items.ids[p] for p in positions]
        images, missing, problems = load_item_images(self.dataset.images, ids)
        self.problems += problems
        return dict(pre(images=images, return_tensors="pt")), missing

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        device = self.backbone.device
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        if "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(self.backbone.dtype)
        with torch.inference_mode():
            return self.backbone.model(**moved, output_hidden_states=True)

    def pooled(self, inputs: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        return pool_layers(outputs.hidden_states, inputs.get("attention_mask"), self.backbone.spec.pooling,
                           self.layers)

    def batches(self, positions: range) -> list[list[int]]:
        """The batches of one chunk. Texts are grouped by token length (stable order), so that a batch pads
        little; the grouping depends only on the chunk, so a resumed run forms the same batches."""
        order = list(positions)
        if self.texts is not None:
            lengths = self.backbone.preprocessor([self.texts[p] for p in order], truncation=True,
                                                 max_length=self.backbone.spec.max_tokens)["input_ids"]
            order = [p for _, p in sorted(zip((len(ids) for ids in lengths), order), key=lambda pair: pair[0])]
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def encode(self, positions: range) -> tuple[np.ndarray, np.ndarray]:
        """States [len(positions), K, D] fp32 and missing flags for consecutive item positions."""
        K, D = len(self.layers), self.backbone.info.hidden_size
        states = np.empty((len(positions), K, D), dtype=np.float32)
        missing = np.zeros(len(positions), dtype=bool)
        for batch in self.batches(positions):
            inputs, flags = self.inputs(batch)
            rows = [p - positions.start for p in batch]
            states[rows] = self.pooled(inputs, self.forward(inputs)).cpu().numpy()
            missing[rows] = flags
        return states, missing
