"""Which hidden states a cache keeps (LayerDrop), as pure functions of the layer counts.

Hidden-state index 0 is the embedding output; index b + 1 is the output of block b (0-based). A model
with L blocks has L + 1 hidden states.

- `even` (docs/method.md §5.2): the embedding output plus every second block, anchored at the last block. For 12
  blocks: [0, 2, 4, 6, 8, 10, 12] (the reference config "1,3,5,7,9,11" shifted by one, prefixed with 0).
  For an odd count the anchor stays at the last block: 3 blocks -> [0, 1, 3].
- `remove_first` (the reference code's variant, docs/method.md §5.2): blocks on [2, 4, ..., 12] for 12
  blocks (K = 6), each intra tower starting from h_0 instead of 0. So h_0 is kept too: the indices are
  those of `even`, [0, 2, ..., 12], and the trainer uses index 0 only as the towers' initial state.
- `group:<L_partner>` (docs/method.md §6.3, the reference code's group LayerDrop for asymmetric pairs): the partner
  tower (e.g. a 12-block ViT) keeps N = L_partner / 2 blocks; this model keeps N blocks anchored at its
  last block with stride k = floor((L - 1) / (N - 1)): blocks {L - 1 - k (N - 1 - j) : j = 0..N-1}, then
  shifted by one and prefixed with 0. Llama-3-70B (80 blocks) with a 12-block partner: k = 15, blocks
  4, 19, 34, 49, 64, 79. The paper's eq. (5), max k with L - k * L_partner / 2 >= 1, gives k = 13 for 80
  blocks and does not reproduce the published lists; the lists satisfy L - k (L_partner / 2 - 1) >= 1,
  i.e. the code's rule, which is implemented here. When the model has no more blocks than N, every
  hidden state is kept and the training side pairs the top states (docs/method.md §6.4, unequal block counts).
- `top:N` / `bottom:N` (IISAN-Versa's layer study, its Table VIII): the last / the first N blocks, prefixed
  with 0 as the other rules are. For 30 blocks, `top:6` = [0, 25, 26, 27, 28, 29, 30] and `bottom:6` =
  [0, 1, 2, 3, 4, 5, 6]; N larger than the block count is an error.
- `all`: every hidden state.
- `i,j,...`: explicit hidden-state indices.
"""

from __future__ import annotations

from iisan.errors import IisanError


class LayerSelectionError(IisanError):
    pass


def even_layers(n_blocks: int) -> list[int]:
    blocks = sorted(range(n_blocks - 1, -1, -2))
    return [0] + [b + 1 for b in blocks]


def group_blocks(n_blocks: int, partner_blocks: int) -> list[int]:
    """The reference code's group LayerDrop: 0-based block ids kept by a model of `n_blocks` paired with a
    partner of `partner_blocks` (which keeps partner_blocks // 2)."""
    keep = partner_blocks // 2
    if keep < 1:
        raise LayerSelectionError(f"group:{partner_blocks}: the partner must have at least 2 blocks")
    if n_blocks <= keep:
        return list(range(n_blocks))
    if keep == 1:
        return [n_blocks - 1]
    stride = (n_blocks - 1) // (keep - 1)
    return [n_blocks - 1 - stride * (keep - 1 - j) for j in range(keep)]


def select_layers(rule: str, n_hidden_states: int) -> list[int]:
    """Hidden-state indices kept by `rule` for a model with `n_hidden_states` (= blocks + 1)."""
    n_blocks = n_hidden_states - 1
    if n_blocks < 1:
        raise LayerSelectionError(f"a model needs at least one block (got {n_hidden_states} hidden states)")
    rule = rule.strip()
    if rule == "all":
        return list(range(n_hidden_states))
    if rule == "even":
        return even_layers(n_blocks)
    if rule == "remove_first":
        return even_layers(n_blocks)  # h_0 included: the intra towers' initial state
    if rule.startswith(("top:", "bottom:")):
        side, _, count = rule.partition(":")
        try:
            n = int(count)
        except ValueError:
            raise LayerSelectionError(f"'{rule}': expected {side}:<block count>, e.g. {side}:6") from None
        if not 1 <= n <= n_blocks:
            raise LayerSelectionError(f"'{rule}': the model has {n_blocks} blocks; choose 1..{n_blocks}")
        blocks = range(n_blocks - n + 1, n_blocks + 1) if side == "top" else range(1, n + 1)
        return [0] + list(blocks)
    if rule.startswith("group:"):
        try:
            partner = int(rule.split(":", 1)[1])
        except ValueError:
            raise LayerSelectionError(f"'{rule}': expected group:<partner block count>, e.g. group:12") from None
        blocks = group_blocks(n_blocks, partner)
        if len(blocks) == n_blocks:
            return list(range(n_hidden_states))  # fewer blocks than the partner keeps: keep everything
        return [0] + [b + 1 for b in blocks]
    try:
        layers = [int(part) for part in rule.split(",") if part.strip()]
    except ValueError:
        raise LayerSelectionError(f"'{rule}': expected even, remove_first, group:<L>, top:<N>, bottom:<N>, all, "
                                  f"or indices like 0,4,8,12") from None
    if not layers:
        raise LayerSelectionError("empty layer selection")
    bad = [i for i in layers if not 0 <= i < n_hidden_states]
    if bad:
        raise LayerSelectionError(f"hidden-state indices {bad} out of range: the model has {n_hidden_states} "
                                  f"(0 = embeddings .. {n_blocks} = last block)")
    if len(set(layers)) != len(layers):
        raise LayerSelectionError(f"'{rule}': an index repeats")
    return sorted(layers)
