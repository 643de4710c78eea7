"""Turning items into pooled per-layer states: text cleaning, tokenization / image processing, the
forward pass, pooling. `ChunkEncoder.encode(positions)` is what extraction (and its benchmark) runs per
chunk; batches never straddle chunks, so a resumed run pads exactly like an uninterrupted one.

With `final=True` the encoder also pools the model's own output, `last_hidden_state` (after the final norm
of models that have one, e.g. ViT / DINOv2); `probe_final_state()` tells whether that differs from the last
hidden state, from one forward pass."""

from __future__ import annotations

import html
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from iisan.data.dataset import Dataset
from iisan.data.images import load_item_images
from iisan.errors import IisanError
from iisan.extract.models import Backbone
from iisan.extract.pooling import pool, pool_layers

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
    final: bool = False             # encode() also returns the pooled last_hidden_state

    def __post_init__(self) -> None:
        if self.backbone.spec.kind == "text":
            raw = self.dataset.field_texts(self.field or "title")
            self.texts = [clean_text(t, self.text_clean) for t in raw]
        else:
            self.texts = None
        self.problems: list[str] = []  # missing or corrupt images, empty texts
        self._token_cache: dict[int, dict[str, list[int]]] = {}
        if self.texts is not None and hasattr(self.backbone.preprocessor, "deprecation_warnings"):
            # Padding kept tokenizations with `pad` is deliberate (each text is tokenized once per chunk).
            self.backbone.preprocessor.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True

    def _stand_in(self, text: str) -> str:
        # An empty text would give no token at all to a tokenizer that adds none (decoder LLMs): encode it
        # as one special token instead; the item is flagged missing either way.
        pre = self.backbone.preprocessor
        return text if text else (pre.unk_token or pre.eos_token or pre.bos_token or "?")

    def _tokenize(self, positions: list[int]) -> list[dict[str, list[int]]]:
        pre = self.backbone.preprocessor
        texts = [self._stand_in(self.texts[p]) for p in positions]
        encoded = pre(texts, truncation=True, max_length=self.backbone.spec.max_tokens, return_attention_mask=True)
        return [{key: encoded[key][i] for key in encoded.keys()} for i in range(len(texts))]

    def inputs(self, positions: range | list[int]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        """Model inputs for a batch of item positions, and each item's `missing` flag."""
        positions = list(positions)
        if self.texts is not None:
            missing = [not self.texts[p] for p in positions]
            for p, m in zip(positions, missing):
                if m:
                    self.problems.append(f"item '{self.dataset.items.ids[p]}': empty text")
            cached = [self._token_cache.pop(p, None) for p in positions] if self._token_cache else []
            encodings = cached if cached and all(e is not None for e in cached) else self._tokenize(positions)
            padded = self.backbone.preprocessor.pad(encodings, padding=True, return_tensors="pt",
                                                    return_attention_mask=True)
            return dict(padded), missing
        ids = [self.dataset.items.ids[p] for p in positions]
        images, missing, problems = load_item_images(self.dataset.images, ids)
        self.problems += problems
        return dict(self.backbone.preprocessor(images=images, return_tensors="pt")), missing

    def forward(self, inputs: dict[str, torch.Tensor]) -> Any:
        device = self.backbone.device
        moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        if "pixel_values" in moved:
            moved["pixel_values"] = moved["pixel_values"].to(self.backbone.dtype)
        with torch.inference_mode():
            return self.backbone.model(**moved, output_hidden_states=True)

    def pooled(self, inputs: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        return pool_layers(outputs.hidden_states, inputs.get("attention_mask"), self.backbone.spec.pooling,
                           self.layers)

    def pooled_final(self, inputs: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        """The model's output `last_hidden_state` pooled like the hidden states: [B, D] fp32."""
        return pool(outputs.last_hidden_state, inputs.get("attention_mask"), self.backbone.spec.pooling)

    def probe_final_state(self, position: int = 0) -> str:
        """"stored" if the model's `last_hidden_state` differs (bitwise) from its last hidden state, i.e. the
        model applies a final norm or other output step that the hidden states do not include; "last_layer"
        if they are equal. Decided from one forward pass of the item at `position` (the first item by default);
        architecture-agnostic. The problems that item's inputs report are not kept (extraction reports them
        when it encodes the item)."""
        known = len(self.problems)
        inputs, _ = self.inputs([position])
        del self.problems[known:]
        outputs = self.forward(inputs)
        last = outputs.hidden_states[-1]
        final = getattr(outputs, "last_hidden_state", None)
        if final is None:
            raise IisanError(f"model '{self.backbone.spec.name}' gives no last_hidden_state")
        if final.shape != last.shape:
            raise IisanError(f"model '{self.backbone.spec.name}': last_hidden_state {tuple(final.shape)} is not "
                             f"shaped like its hidden states {tuple(last.shape)}; cannot pool it alike")
        return "last_layer" if torch.equal(final, last) else "stored"

    def batches(self, positions: range) -> list[list[int]]:
        """The batches of one chunk. Texts are grouped by token length (stable order), so that a batch pads
        little; the grouping depends only on the chunk, so a resumed run forms the same batches. The
        tokenization is kept for `inputs`, which only pads it."""
        order = list(positions)
        if self.texts is not None and order:
            encodings = self._tokenize(order)
            self._token_cache = dict(zip(order, encodings))
            lengths = [len(e["input_ids"]) for e in encodings]
            order = [p for _, p in sorted(zip(lengths, order), key=lambda pair: pair[0])]
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def encode(self, positions: range) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """States [len(positions), K, D] fp32 and missing flags for consecutive item positions; with
        `final`, also the pooled last_hidden_state [len(positions), D] fp32: (states, missing, final).

        The next batch's inputs (tokenizing, or decoding and processing images) are prepared in a
        background thread while the current batch runs through the model."""
        K, D = len(self.layers), self.backbone.info.hidden_size
        states = np.empty((len(positions), K, D), dtype=np.float32)
        final = np.empty((len(positions), D), dtype=np.float32) if self.final else None
        missing = np.zeros(len(positions), dtype=bool)
        batches = self.batches(positions)
        if not batches:
            return (states, missing, final) if self.final else (states, missing)
        pooled: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []
        with ThreadPoolExecutor(max_workers=1) as executor:
            upcoming = executor.submit(self.inputs, batches[0])
            for i, batch in enumerate(batches):
                inputs, flags = upcoming.result()
                if i + 1 < len(batches):
                    upcoming = executor.submit(self.inputs, batches[i + 1])
                outputs = self.forward(inputs)
                rows = [p - positions.start for p in batch]
                pooled.append((rows, self.pooled(inputs, outputs),
                               self.pooled_final(inputs, outputs) if self.final else None))
                missing[rows] = flags
        for rows, values, last in pooled:  # one device-to-host copy per batch, after the chunk's forwards
            states[rows] = values.cpu().numpy()
            if last is not None:
                final[rows] = last.cpu().numpy()
        return (states, missing, final) if self.final else (states, missing)
