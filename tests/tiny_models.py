"""Tiny randomly initialised models built from configs and saved locally (the hub is unreachable here),
plus a registry that names them, for extraction tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a of and to in for with on is by new set kit pro mini digital meter gauge pressure motor cable "
         "tester lcd dual display auto power off large small blue red steel glass lab scientific tool pump "
         "valve sensor probe film movie story love war night day man woman city house").split()


def text_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "&", ";"] + WORDS


def build_tiny_bert(folder: Path, layers: int = 3, hidden: int = 32) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(text_vocab())}, do_lower_case=True)
    assert len(tokenizer) == len(text_vocab())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(text_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def llama_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_tiny_llama(folder: Path, layers: int = 4, hidden: int = 128) -> Path:
    """Dimensions are multiples of 32 so that GPTQ (group size 32) can quantize every linear layer."""
    from transformers import LlamaConfig, LlamaModel

    tokenizer = llama_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_dinov2(folder: Path, layers: int = 3, hidden: int = 32) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2,
                          patch_size=14, image_size=28)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def write_registry(path: Path, models: dict[str, dict], datasets: dict[str, dict] | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"datasets": datasets or {"toy": {}}, "models": models}, sort_keys=False))
    return path
