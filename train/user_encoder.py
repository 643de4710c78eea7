"""The SASRec-style user encoder (docs/method.md §2.1): post-LN transformer blocks over the item embeddings of a
user's window, with a learned absolute position embedding."""

from __future__ import annotations

import torch
from torch import nn

from iisan.train.distributed import current_window, global_noise


class SampleDropout(nn.Dropout):
    """nn.Dropout; inside `sample_window` (a process holding some rows of a global batch) the mask is drawn for
    the whole global batch as nn.Dropout would draw it in one process, and this process's rows are kept, so
    that every sample's mask is the same whatever the process count (train/distributed.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = current_window()
        if window is None or not self.training or self.p == 0:
            return super().forward(x)
        return x * global_noise(x, self.p, window)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, p: float,
               training: bool) -> torch.Tensor:
    """scaled_dot_product_attention; inside `sample_window` while training with dropout, the same product
    written out (as its CPU math kernel computes it: on CPU the two agree bit for bit, tests/test_distributed.py)
    with the attention-dropout mask drawn per global sample."""
    window = current_window()
    if window is None or not training or p == 0:
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=p if training else 0.0)
    scale = (1.0 / q.shape[-1] ** 0.5) ** 0.5
    weights = (q * scale) @ (k * scale).transpose(-2, -1)
    weights = weights.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights * global_noise(weights, p, window)) @ v


class UserEncoder(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 2, blocks: int = 2, max_len: int = 10, dropout: float = 0.1,
                 eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.positions = nn.Embedding(max_len, dim)
        self.input_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = SampleDropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout, eps) for _ in range(blocks))
        for module in self.modules():  # Xavier-normal for Linear and Embedding weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.xavier_normal_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """items [B, L, dim] item embeddings (left-padded); mask [B, L] (1 = real item) -> [B, L, dim].

        Key j is visible to query i iff j <= i and j is a real item. A padding query has no such key; it
        attends to itself instead (its output is never used: no loss, no evaluation reads it)."""
        B, L, _ = items.shape
        x = self.dropout(self.input_norm(items + self.positions.weight[:L]))
        causal = torch.ones(L, L, dtype=torch.bool, device=items.device).tril()
        visible = causal[None] & mask.bool()[:, None, :]
        visible = visible | torch.eye(L, dtype=torch.bool, device=items.device)[None] & ~visible.any(-1, keepdim=True)
        for block in self.blocks:
            x = block(x, visible)
        return x


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.attention_dropout = dropout
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, 4 * dim)
        self.ffn_out = nn.Linear(4 * dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.dropout = SampleDropout(dropout)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        attended = _attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), visible[:, None],
                              self.attention_dropout, self.training)
        a = self.norm1(x + self.dropout(self.o(attended.transpose(1, 2).reshape(B, L, D))))
        return self.norm2(a + self.dropout(self.ffn_out(torch.relu(self.ffn_in(a)))))
