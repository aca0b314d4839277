"""Checkpoint verification (quantmill/io/verify.py): a broken float checkpoint is refused with one line
naming the file and tensors, from the headers alone when it can be, before anything is committed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantmill.core.errors import SourceError
from quantmill.io.sources import validate_source
from quantmill.io.verify import check_headers, verify_checkpoint
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("verify") / "good")


@pytest.fixture
def copy(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def _rewrite(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _refusal(fn, folder: Path) -> str:
    with pytest.raises(SourceError) as err:
        fn(folder)
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_a_good_checkpoint_passes_both_checks(good) -> None:
    check_headers(good)
    verify_checkpoint(good)
    assert validate_source(str(good)).kind == "dir"


def test_a_missing_decoder_layer_is_named_from_the_headers(copy) -> None:
    _rewrite(copy, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.1.")]])
    message = _refusal(check_headers, copy)
    assert message == (
        f"{copy}: 9 tensor(s) of the architecture missing from the checkpoint: model.layers.1.input_layernorm.weight, "
        "model.layers.1.mlp.down_proj.weight, model.layers.1.mlp.gate_proj.weight, model.layers.1.mlp.up_proj.weight and 5 more "
        "(transformers would fill them with random values)"
    )
    assert _refusal(lambda f: validate_source(str(f)), copy) == message


def test_a_wrong_shape_is_named(copy) -> None:
    _rewrite(copy, lambda t: t.update({"model.norm.weight": torch.ones(32)}))
    assert _refusal(check_headers, copy) == f"{copy}: tensor model.norm.weight in model.safetensors has shape [32], the architecture needs [64]"


def test_integer_weights_where_floats_belong_are_named(copy) -> None:
    _rewrite(copy, lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.int8)}))
    assert _refusal(check_headers, copy) == f"{copy}: tensor lm_head.weight in model.safetensors is I8, the architecture needs a float tensor"


def test_a_truncated_file_is_named(copy) -> None:
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _refusal(check_headers, copy)
    assert message.startswith(f"{path}: truncated (its header describes ") and "bytes of tensor data, the file holds" in message


def test_random_bytes_are_named(copy) -> None:
    path = copy / "model.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes())
    assert _refusal(check_headers, copy).startswith(f"{path}: not a safetensors file (header length ")


def test_a_missing_shard_named_in_the_index_is_named(copy) -> None:
    (copy / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}')
    assert _refusal(check_headers, copy) == f"{copy}: shard(s) model-00002-of-00002.safetensors named in model.safetensors.index.json are missing"


def test_no_tokenizer_files_is_named(copy) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (copy / name).unlink(missing_ok=True)
    assert _refusal(check_headers, copy) == (
        f"{copy}: no tokenizer files (one of tokenizer.json, tokenizer.model, vocab.json, vocab.txt, spiece.model): copy the model's tokenizer next to config.json"
    )


def test_a_tokenizer_that_does_not_load_is_named_by_the_full_check(copy) -> None:
    (copy / "tokenizer.json").write_text("{not json")
    check_headers(copy)  # the files are there
    assert _refusal(verify_checkpoint, copy).startswith(f"{copy}: the tokenizer does not load (")


def test_non_finite_values_are_named_by_the_full_check(copy) -> None:
    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, :5] = float("nan")
        t["model.layers.0.mlp.up_proj.weight"][4, 0] = float("inf")

    _rewrite(copy, poison)
    check_headers(copy)  # headers cannot see values
    assert _refusal(verify_checkpoint, copy) == f"{copy}: tensor model.layers.0.mlp.up_proj.weight in model.safetensors has 6 non-finite value(s) (NaN or inf)"


def test_tied_embeddings_need_only_one_of_the_tied_names(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import make_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=257, tie_word_embeddings=True)
    folder = tmp_path / "tied"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    verify_checkpoint(folder)


def _tiny_config(model_type: str):
    from transformers import AutoConfig

    common = dict(vocab_size=257, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=64, **common)
    if model_type == "opt":
        return AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64, **common)
    return AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64, **common)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "opt", "gpt2"])
def test_every_supported_architecture_saved_by_transformers_passes(tmp_path, model_type) -> None:
    from transformers import AutoModelForCausalLM

    from quantmill.model.arch import LAYOUTS
    from tests.tiny import make_tokenizer

    assert model_type in LAYOUTS
    torch.manual_seed(0)
    folder = tmp_path / model_type
    AutoModelForCausalLM.from_config(_tiny_config(model_type)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    verify_checkpoint(folder)


@pytest.mark.parametrize("model_type, prefix", [("gpt2", "transformer."), ("opt", "model.")])
def test_hub_style_names_without_the_base_model_prefix_pass(tmp_path, model_type, prefix) -> None:
    """gpt2's and opt's hub checkpoints name tensors `h.0...` / `decoder...`; transformers loads them."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_tokenizer

    folder = tmp_path / model_type
    AutoModelForCausalLM.from_config(_tiny_config(model_type)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    _rewrite(folder, lambda t: [t.__setitem__(k[len(prefix) :], t.pop(k)) for k in [k for k in t if k.startswith(prefix)]])
    assert not any(k.startswith(prefix) for k in load_file(folder / "model.safetensors"))
    verify_checkpoint(folder)
