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


def make_tiny_gpt2(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """save_pretrained of a seeded random GPT2LMHeadModel (its blocks use transformers' Conv1D,
    not nn.Linear) plus the byte-level tokenizer; returns the folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=128, vocab_size=257, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def make_tiny_llama_with_outliers(folder: Path, channels: list[int], factor: float, layers: int = 2) -> Path:
    """The tiny Llama with a few large residual-stream channels (both norm weights x factor
    there): every Linear behind a norm sees outlier input channels, as in real LLMs."""
    from quantmill.io.sources import load_model

    make_tiny_llama(folder, layers=layers)
    model = load_model(folder)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[channels] *= factor
    model.save_pretrained(folder)
    return folder


class _Stop(Exception):
    pass


def capture_block_inputs(model, ids: torch.Tensor, i: int) -> tuple[torch.Tensor, dict]:
    """Hidden states and keyword arguments the model passes to decoder layer i."""
    got: dict = {}

    def pre_hook(mod, args, kwargs):
        got["x"] = (args[0] if args else kwargs.pop("hidden_states")).detach()
        got["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    h = model.model.layers[i].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)  # no KV cache in the kwargs: re-running the layer must not grow it
    except _Stop:
        pass
    finally:
        h.remove()
    return got["x"], got["kw"]
