"""Layer selection (docs/method.md §5.2, §6.3): the reference tables and the edge cases."""

from __future__ import annotations

import re

import pytest

from iisan.extract.layers import LayerSelectionError, group_blocks, select_layers


@pytest.mark.parametrize("n_blocks, expected", [
    (12, [0, 2, 4, 6, 8, 10, 12]),      # docs/method.md §5.2: K = 7 for BERT-base / ViT-base
    (6, [0, 2, 4, 6]),
    (3, [0, 1, 3]),                      # odd count: anchored at the last block
    (5, [0, 1, 3, 5]),
    (1, [0, 1]),
    (24, [0] + list(range(2, 25, 2))),
])
def test_even(n_blocks, expected):
    assert select_layers("even", n_blocks + 1) == expected


def test_remove_first_and_all_and_explicit():
    # h_0 is kept: the intra towers start from it; the blocks run on [2, ..., 12] (K = 6)
    assert select_layers("remove_first", 13) == [0, 2, 4, 6, 8, 10, 12]
    assert select_layers("all", 4) == [0, 1, 2, 3]
    assert select_layers("12, 0,4", 13) == [0, 4, 12]


@pytest.mark.parametrize("n_blocks, stride, blocks", [  # docs/method.md §6.3 table, partner = 12-block ViT
    (24, 4, [3, 7, 11, 15, 19, 23]),     # BERT-large
    (28, 5, [2, 7, 12, 17, 22, 27]),     # Gemma-7B
    (32, 6, [1, 7, 13, 19, 25, 31]),     # Llama-2/3-8B, Mistral
    (80, 15, [4, 19, 34, 49, 64, 79]),   # Llama-3-70B
])
def test_group_layerdrop_table(n_blocks, stride, blocks):
    assert group_blocks(n_blocks, 12) == blocks
    assert all(b - a == stride for a, b in zip(blocks, blocks[1:]))
    assert select_layers("group:12", n_blocks + 1) == [0] + [b + 1 for b in blocks]


def test_group_rule_is_the_codes_not_eq5():
    # eq. (5): max k with L - k * L_img / 2 >= 1 gives 13 for 80 blocks; the code's table uses 15.
    eq5 = max(k for k in range(1, 80) if 80 - k * 6 >= 1)
    assert eq5 == 13 and group_blocks(80, 12)[1] - group_blocks(80, 12)[0] == 15


@pytest.mark.parametrize("n_blocks, partner, expected", [
    (3, 12, [0, 1, 2, 3]),               # fewer blocks than the partner keeps: keep them all
    (6, 12, [0, 1, 2, 3, 4, 5, 6]),      # exactly as many: all of them
    (30, 12, [0, 5, 10, 15, 20, 25, 30]),  # SmolLM2-135M
    (12, 2, [0, 12]),                    # partner keeps one block: the last
    (12, 24, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
])
def test_group_edge_cases(n_blocks, partner, expected):
    assert select_layers(f"group:{partner}", n_blocks + 1) == expected


@pytest.mark.parametrize("rule, message", [
    ("0,13", r"indices \[13\] out of range: the model has 13"),
    ("1,1", "an index repeats"),
    ("odd", "expected even, remove_first"),
    ("group:x", "expected group:<partner block count>"),
    ("group:1", "the partner must have at least 2 blocks"),
])
def test_bad_rules(rule, message):
    with pytest.raises(LayerSelectionError, match=message):
        select_layers(rule, 13)


def test_top_and_bottom_rules():
    assert select_layers("top:6", 31) == [0, 25, 26, 27, 28, 29, 30]
    assert select_layers("bottom:6", 31) == [0, 1, 2, 3, 4, 5, 6]
    assert select_layers("top:6", 7) == select_layers("bottom:6", 7) == select_layers("all", 7)
    assert select_layers("top:1", 13) == [0, 12] and select_layers("bottom:1", 13) == [0, 1]
    for rule, message in (("top:7", "the model has 6 blocks; choose 1..6"), ("bottom:0", "choose 1..6"),
                          ("top:x", "expected top:<block count>")):
        with pytest.raises(LayerSelectionError, match=re.escape(message)):
            select_layers(rule, 7)
