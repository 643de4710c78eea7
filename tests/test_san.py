"""Side-adapted networks and the user encoder: parameter counts (docs/method.md §5.7, §6.4) and equality with a slow
per-block loop written straight from docs/method.md §5.5 / §6.4."""

from __future__ import annotations

import pytest
import torch

from iisan.train.san import SANConfig, SideNetwork
from iisan.train.user_encoder import UserEncoder


def trainable(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def test_iisan_vs_parameter_count():
    """BERT-base + ViT-base, K = 7, r = 64, d = 64: 4,113,877 (docs/method.md §5.7)."""
    side = SideNetwork({"text": 7, "image": 7}, {"text": 768, "image": 768})
    user = UserEncoder()
    assert trainable(user) == 100_224
    assert trainable(side) + trainable(user) == 4_113_877


def test_iisan_va_parameter_count():
    """Llama-3-70B (8192) + ViT-base (768): ≈54.2M, of which the DTLs ≈44M (docs/method.md §6.4)."""
    side = SideNetwork({"text": 7, "image": 7}, {"text": 8192, "image": 768})
    assert trainable(side.inter.map_text) == 7 * (8192 * 768 + 768) == 44_045_568
    assert side.inter.map_second is None
    assert trainable(side) + trainable(UserEncoder()) == 54_165_589


@pytest.mark.parametrize("cfg, parts", [(SANConfig(inter=False), 2), (SANConfig(intra=False), 1),
                                        (SANConfig(fusion="add"), 3)])
def test_ablation_shapes(cfg, parts):
    side = SideNetwork({"text": 7, "image": 7}, {"text": 32, "image": 32}, cfg)
    assert side.fusion.in_features == parts * 64
    assert (side.intra["text"].gates is None) == (cfg.fusion == "add") if cfg.intra else True
    out = side({"text": torch.randn(5, 7, 32), "image": torch.randn(5, 7, 32)})
    assert out.shape == (5, 64)


def test_text_only():
    side = SideNetwork({"text": 4}, {"text": 24})
    assert side.inter is None and side.fusion.in_features == 64
    assert side({"text": torch.randn(3, 4, 24)}).shape == (3, 64)


def sanb(block, x):
    W_d, b_d, W_u, b_u = block.down.weight, block.down.bias, block.up.weight, block.up.bias
    return x + (torch.relu(x @ W_d.T + b_d) @ W_u.T + b_u)


def reference(side: SideNetwork, states: dict[str, torch.Tensor]) -> torch.Tensor:
    """docs/method.md §5.5 / §6.4, one block at a time, from the module's parameters."""
    parts = []
    for m in ("image", "text2", "text"):
        if m not in side.intra:
            continue
        tower = side.intra[m]
        first = m in side.cfg.init_from_first  # remove_first: s_{-1} = h_0, blocks on the states after it
        h = states[m][:, 1:] if first else states[m]
        s = states[m][:, 0] if first else torch.zeros_like(states[m][:, 0])
        for k, block in enumerate(tower.blocks):
            g = torch.sigmoid(tower.gates.theta[k] / 0.1)
            s = sanb(block, g * h[:, k] + (1 - g) * s)
        head = side.heads[m]
        parts.append((s @ head.F.weight.T + head.F.bias) @ head.P.weight.T + head.P.bias)
    if side.inter is not None:
        inter = side.inter
        n = len(inter.blocks)
        img, txt = states[side.second][:, -n:], states["text"][:, -n:]
        z = torch.zeros(img.shape[0], inter.dim)
        for k, block in enumerate(inter.blocks):
            beta = torch.sigmoid(inter.gates.theta[k] / 0.1)
            x_txt = txt[:, k] @ inter.map_text[k].weight.T + inter.map_text[k].bias if inter.map_text else txt[:, k]
            x_img = img[:, k] @ inter.map_second[k].weight.T + inter.map_second[k].bias if inter.map_second else img[:, k]
            z = sanb(block, z + beta * x_img + (1 - beta) * x_txt)
        head = side.heads["inter"]
        parts.append((z @ head.F.weight.T + head.F.bias) @ head.P.weight.T + head.P.bias)
    return torch.cat(parts, -1) @ side.fusion.weight.T + side.fusion.bias


@pytest.mark.parametrize("layers, dims, first", [
    ({"text": 7, "image": 7}, {"text": 48, "image": 48}, ()),     # VS
    ({"text": 7, "image": 7}, {"text": 48, "image": 48}, ("text", "image")),  # remove_first: h_0 starts s
    ({"text2": 7, "text": 7}, {"text": 48, "text2": 48}, ()),     # multimodal text
    ({"text": 7, "image": 7}, {"text": 96, "image": 40}, ()),     # VA, text wider: text mapped
    ({"text": 5, "image": 7}, {"text": 40, "image": 96}, ()),     # VA, image wider, unequal block counts
    ({"text": 13, "image": 7}, {"text": 64, "image": 32}, ()),    # 12 + 6 blocks: extra text blocks run intra only
])
def test_item_embeddings_equal_the_slow_reference(layers, dims, first):
    torch.manual_seed(0)
    side = SideNetwork(layers, dims, SANConfig(bottleneck=16, init_from_first=first))
    second = next(m for m in layers if m != "text")
    if first:  # K = 7 states with h_0 first: 6 blocks per tower, the inter tower pairs the 6 after h_0
        assert len(side.intra["text"].blocks) == 6 and len(side.inter.blocks) == 6
    with torch.no_grad():  # move gates and biases off their initial values so every term matters
        for p in side.parameters():
            p.add_(0.05 * torch.randn_like(p))
    states = {m: torch.randn(9, layers[m], dims[m]) for m in layers}
    torch.testing.assert_close(side(states), reference(side, states), atol=1e-6, rtol=0)


def test_user_encoder_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    enc = UserEncoder(dim=16, heads=2, max_len=6).eval()
    items = torch.randn(2, 6, 16)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = enc(items, mask)
    assert torch.isfinite(out).all()
    changed = items.clone()
    changed[0, 5] += torch.randn(16)      # a later item cannot change earlier positions
    changed[0, 0] += 5 * torch.randn(16)  # nor can a padding slot change real positions
    # (random changes: LayerNorm would hide a constant shift)
    out2 = enc(changed, mask)
    torch.testing.assert_close(out2[0, 2:5], out[0, 2:5])
    assert not torch.allclose(out2[0, 5], out[0, 5])
