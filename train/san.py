"""Side-adapted networks of IISAN (docs/method.md §5, symmetric IISAN-VS) and IISAN-Versa (docs/method.md §6.4, asymmetric
IISAN-VA), fed with cached per-layer states instead of running backbones.

Slots (`Slot`): `text`, plus at most one second slot, `image` (IISAN's multimodal setting) or `text2` (a
second text encoder or field: the multimodal-text setting, docs/method.md §6.5). Every tower is a short loop over
its K blocks; states arrive as [n, K, D] tensors gathered from the cache for the unique items of a batch.
A tower whose slot reads its layers with `remove_first` gets h_0 as its first state and uses it only as
the initial state s_{-1} of the intra recurrence (docs/method.md §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn


class Slot(str, Enum):
    """A modality slot of the item encoder, named for what it holds."""

    TEXT = "text"
    IMAGE = "image"
    TEXT2 = "text2"


SECOND_SLOTS = (Slot.IMAGE.value, Slot.TEXT2.value)


@dataclass
class SANConfig:
    """Side-network hyper-parameters (docs/method.md §5, §8 defaults)."""

    bottleneck: int = field(default=64, metadata={"help": "r: SAN block bottleneck width (per tower)"})
    embedding_dim: int = field(default=64, metadata={"help": "d: item embedding width"})
    fusion: str = field(default="gated", metadata={"help": "gated (learned σ(θ/0.1) gates) | add (no gates)"})
    intra: bool = field(default=True, metadata={"help": "intra-modal towers (ablation: False)"})
    inter: bool = field(default=True, metadata={"help": "inter-modal tower (ablation: False)"})
    gate_temperature: float = field(default=0.1, metadata={"help": "gate = σ(θ / temperature)"})
    init_from_first: tuple[str, ...] = field(default=(), metadata={
        "help": "slots whose first state is h_0, the intra tower's initial state (remove_first)"})


class SANBlock(nn.Module):
    """x + W_up ReLU(W_down x + b_d) + b_u; weights N(0, 0.01²), zero biases; no LayerNorm, no dropout.
    (With `activation=gelu` it is also the Houlsby adapter of the embedded baseline, train/tuning.py.)"""

    def __init__(self, dim: int, bottleneck: int, activation=torch.relu):
        super().__init__()
        self.activation = activation
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.activation(self.down(x)))


class Gates(nn.Module):
    """One scalar θ per block, initialised to 0 (gate 0.5); gate_k = σ(θ_k / temperature)."""

    def __init__(self, blocks: int, temperature: float):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(blocks))
        self.temperature = temperature

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.theta / self.temperature)


class IntraTower(nn.Module):
    """s_k = SANB_k(g_k h_{S[k]} + (1 - g_k) s_{k-1}), s_{-1} = 0 (with `add`: h_{S[k]} + s_{k-1}).

    With `init_from_first` the first state given is h_0 and only starts the recurrence: s_{-1} = h_0, and
    the blocks run on the states after it (the reference code's remove_first)."""

    def __init__(self, blocks: int, dim: int, cfg: SANConfig, init_from_first: bool = False):
        super().__init__()
        self.init_from_first = init_from_first
        self.blocks = nn.ModuleList(SANBlock(dim, cfg.bottleneck) for _ in range(blocks))
        self.gates = Gates(blocks, cfg.gate_temperature) if cfg.fusion == "gated" else None

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        gates = self.gates() if self.gates is not None else None
        if self.init_from_first:
            s, states = states[:, 0], states[:, 1:]
        else:
            s = torch.zeros_like(states[:, 0])
        for k, block in enumerate(self.blocks):
            h = states[:, k]
            s = block(gates[k] * h + (1 - gates[k]) * s if gates is not None else h + s)
        return s


class InterTower(nn.Module):
    """z_k = SANB_k(z_{k-1} + β_k a_k + (1 - β_k) b_k), z_{-1} = 0, on the top `blocks` states of each side.

    With unequal widths the wider side goes through a dimension-transformation layer (one Linear with bias per
    block) to the narrower width, in which the tower runs (docs/method.md §6.4)."""

    def __init__(self, blocks: int, dim_second: int, dim_text: int, cfg: SANConfig):
        super().__init__()
        self.dim = min(dim_second, dim_text)
        self.blocks = nn.ModuleList(SANBlock(self.dim, cfg.bottleneck) for _ in range(blocks))
        self.gates = Gates(blocks, cfg.gate_temperature) if cfg.fusion == "gated" else None
        self.map_text = (nn.ModuleList(nn.Linear(dim_text, self.dim) for _ in range(blocks))
                         if dim_text > dim_second else None)
        self.map_second = (nn.ModuleList(nn.Linear(dim_second, self.dim) for _ in range(blocks))
                           if dim_second > dim_text else None)

    def forward(self, second: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """second: the image (or text2) states, β's side; text: the text states. The top states are paired."""
        n = len(self.blocks)
        second, text = second[:, -n:], text[:, -n:]
        gates = self.gates() if self.gates is not None else None
        z = second.new_zeros(second.shape[0], self.dim)
        for k, block in enumerate(self.blocks):
            a = self.map_second[k](second[:, k]) if self.map_second is not None else second[:, k]
            b = self.map_text[k](text[:, k]) if self.map_text is not None else text[:, k]
            z = block(z + (gates[k] * a + (1 - gates[k]) * b if gates is not None else a + b))
        return z


class Head(nn.Module):
    """e = P(F(s)), no activation between (docs/method.md §5.6 / §6.4)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.F = nn.Linear(dim, hidden)
        self.P = nn.Linear(hidden, out)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.P(self.F(s))


class SideNetwork(nn.Module):
    """The IISAN / IISAN-Versa item encoder on cached states.

    `layers`: the states each slot gives (K_text, and K of the second slot when there is one, h_0 included
    for a slot in `cfg.init_from_first`); `dims`: the hidden size of each. Symmetric widths give the
    IISAN-VS heads (F: D -> D, P: D -> d); unequal widths the IISAN-VA heads (F: D -> d, P: d -> d; inter
    F: D_min -> D_min). Fusion: Linear over [e_second; e_text; e_inter] (docs/method.md §2.2 order), or over
    whichever of them exist."""

    def __init__(self, layers: dict[str, int], dims: dict[str, int], cfg: SANConfig = SANConfig()):
        super().__init__()
        second = [s for s in layers if s != Slot.TEXT.value]
        if Slot.TEXT.value not in layers or len(second) > 1 or (second and second[0] not in SECOND_SLOTS):
            raise ValueError(f"slots must be text, or text and one of {', '.join(SECOND_SLOTS)}; got {sorted(layers)}")
        self.second = second[0] if second else None
        if not cfg.intra and not (cfg.inter and self.second):
            raise ValueError("without intra towers an inter tower (two modalities) is needed")
        self.cfg = cfg
        self.modalities = ([self.second] if self.second else []) + [Slot.TEXT.value]
        blocks = {m: layers[m] - (1 if m in cfg.init_from_first else 0) for m in self.modalities}
        if min(blocks.values()) < 1:
            raise ValueError(f"every tower needs at least one block; got {blocks}")
        d = cfg.embedding_dim
        symmetric = len(set(dims[m] for m in self.modalities)) == 1
        self.intra = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        if cfg.intra:
            for m in self.modalities:
                self.intra[m] = IntraTower(blocks[m], dims[m], cfg, init_from_first=m in cfg.init_from_first)
                self.heads[m] = Head(dims[m], dims[m], d) if symmetric else Head(dims[m], d, d)
        self.inter = None
        if cfg.inter and self.second:
            self.inter = InterTower(min(blocks.values()), dims[self.second], dims[Slot.TEXT.value], cfg)
            self.heads["inter"] = Head(self.inter.dim, self.inter.dim, d)
        parts = len(self.intra) + (1 if self.inter is not None else 0)
        self.fusion = nn.Linear(parts * d, d)

    def san_parameters(self) -> list[nn.Parameter]:
        """The SAN blocks, gates and DTLs (trained at lr_san); heads and fusion are not among them."""
        return list(self.intra.parameters()) + (list(self.inter.parameters()) if self.inter is not None else [])

    def forward(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        """states[m]: [n, K_m, D_m] -> item embeddings [n, d]."""
        parts = [self.heads[m](self.intra[m](states[m])) for m in self.modalities if m in self.intra]
        if self.inter is not None:
            parts.append(self.heads["inter"](self.inter(states[self.second], states[Slot.TEXT.value])))
        return self.fusion(torch.cat(parts, dim=-1))
