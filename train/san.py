"""Side-adapted networks of IISAN (SPEC §5, symmetric IISAN-VS) and IISAN-Versa (SPEC §6.4, asymmetric
IISAN-VA), fed with cached per-layer states instead of running backbones.

Two modality slots, `txt` and `img` (the second may hold another text encoder: the multimodal-text
setting), or `txt` alone (text only). Every tower is a short loop over its K blocks; states arrive as
[n, K, D] tensors gathered from the cache for the unique items of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SANConfig:
    """Side-network hyper-parameters (SPEC §5, §8 defaults)."""

    bottleneck: int = field(default=64, metadata={"help": "r: SAN block bottleneck width (per tower)"})
    embedding_dim: int = field(default=64, metadata={"help": "d: item embedding width"})
    fusion: str = field(default="gated", metadata={"help": "gated (learned σ(θ/0.1) gates) | add (no gates)"})
    intra: bool = field(default=True, metadata={"help": "intra-modal towers (ablation: False)"})
    inter: bool = field(default=True, metadata={"help": "inter-modal tower (ablation: False)"})
    gate_temperature: float = field(default=0.1, metadata={"help": "gate = σ(θ / temperature)"})


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
    """s_k = SANB_k(g_k h_{S[k]} + (1 - g_k) s_{k-1}), s_{-1} = 0 (with `add`: h_{S[k]} + s_{k-1})."""

    def __init__(self, blocks: int, dim: int, cfg: SANConfig):
        super().__init__()
        self.blocks = nn.ModuleList(SANBlock(dim, cfg.bottleneck) for _ in range(blocks))
        self.gates = Gates(blocks, cfg.gate_temperature) if cfg.fusion == "gated" else None

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        gates = self.gates() if self.gates is not None else None
        s = torch.zeros_like(states[:, 0])
        for k, block in enumerate(self.blocks):
            h = states[:, k]
            s = block(gates[k] * h + (1 - gates[k]) * s if gates is not None else h + s)
        return s


class InterTower(nn.Module):
    """z_k = SANB_k(z_{k-1} + β_k a_k + (1 - β_k) b_k), z_{-1} = 0, on the top `blocks` states of each side.

    With unequal widths the wider side goes through a dimension-transformation layer (one Linear with bias per
    block) to the narrower width, in which the tower runs (SPEC §6.4)."""

    def __init__(self, blocks: int, dim_img: int, dim_txt: int, cfg: SANConfig):
        super().__init__()
        self.dim = min(dim_img, dim_txt)
        self.blocks = nn.ModuleList(SANBlock(self.dim, cfg.bottleneck) for _ in range(blocks))
        self.gates = Gates(blocks, cfg.gate_temperature) if cfg.fusion == "gated" else None
        self.map_txt = nn.ModuleList(nn.Linear(dim_txt, self.dim) for _ in range(blocks)) if dim_txt > dim_img else None
        self.map_img = nn.ModuleList(nn.Linear(dim_img, self.dim) for _ in range(blocks)) if dim_img > dim_txt else None

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        n = len(self.blocks)
        img, txt = img[:, -n:], txt[:, -n:]  # the top states of each side are paired
        gates = self.gates() if self.gates is not None else None
        z = img.new_zeros(img.shape[0], self.dim)
        for k, block in enumerate(self.blocks):
            a = self.map_img[k](img[:, k]) if self.map_img is not None else img[:, k]
            b = self.map_txt[k](txt[:, k]) if self.map_txt is not None else txt[:, k]
            z = block(z + (gates[k] * a + (1 - gates[k]) * b if gates is not None else a + b))
        return z


class Head(nn.Module):
    """e = P(F(s)), no activation between (SPEC §5.6 / §6.4)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.F = nn.Linear(dim, hidden)
        self.P = nn.Linear(hidden, out)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.P(self.F(s))


class SideNetwork(nn.Module):
    """The IISAN / IISAN-Versa item encoder on cached states.

    `layers`: blocks per modality (K_txt, and K_img when there is a second modality); `dims`: the hidden size
    of each. Symmetric widths give the IISAN-VS heads (F: D -> D, P: D -> d); unequal widths the IISAN-VA
    heads (F: D -> d, P: d -> d; inter F: D_min -> D_min). Fusion: Linear over [e_img; e_txt; e_inter]
    (SPEC §2.2 order), or over whichever of them exist."""

    def __init__(self, layers: dict[str, int], dims: dict[str, int], cfg: SANConfig = SANConfig()):
        super().__init__()
        if "txt" not in layers or set(layers) - {"txt", "img"}:
            raise ValueError(f"modalities must be txt, or txt and img; got {sorted(layers)}")
        if not cfg.intra and not (cfg.inter and "img" in layers):
            raise ValueError("without intra towers an inter tower (two modalities) is needed")
        self.cfg = cfg
        self.modalities = [m for m in ("img", "txt") if m in layers]
        d = cfg.embedding_dim
        symmetric = len(set(dims[m] for m in self.modalities)) == 1
        self.intra = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        if cfg.intra:
            for m in self.modalities:
                self.intra[m] = IntraTower(layers[m], dims[m], cfg)
                self.heads[m] = Head(dims[m], dims[m], d) if symmetric else Head(dims[m], d, d)
        self.inter = None
        if cfg.inter and "img" in layers:
            self.inter = InterTower(min(layers["img"], layers["txt"]), dims["img"], dims["txt"], cfg)
            self.heads["inter"] = Head(self.inter.dim, self.inter.dim, d)
        parts = len(self.intra) + (1 if self.inter is not None else 0)
        self.fusion = nn.Linear(parts * d, d)

    def forward(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        """states[m]: [n, K_m, D_m] -> item embeddings [n, d]."""
        parts = [self.heads[m](self.intra[m](states[m])) for m in self.modalities if m in self.intra]
        if self.inter is not None:
            parts.append(self.heads["inter"](self.inter(states["img"], states["txt"])))
        return self.fusion(torch.cat(parts, dim=-1))
