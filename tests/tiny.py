"""A tiny seeded Llama with a byte-level tokenizer, built in code (no download)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # One token per byte (ByteLevel's printable alphabet): any text tokenizes into 256 ids.
    byte_vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.WordLevel(vocab={**{c: i for c, i in byte_vocab.items()}, "<unk>": 256}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split(pattern="", behavior="isolated")])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")


def make_tiny_llama(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128) -> Path:
    """save_pretrained of a seeded random LlamaForCausalLM plus its tokenizer; returns the folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
