"""Model sources: classifying source strings, checking causal LMs, copying and converting checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from quantmill.core.errors import QuantmillError, SourceError
from quantmill.io.sources import DEMO_PACKAGE, ModelSource, check_causal_lm, copy_checkpoint, load_model, parse_source
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("sources") / "tiny-llama", seed=3)


def _message(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------- parse_source


def test_parse_source_demo() -> None:
    assert parse_source("demo") == ModelSource("demo", DEMO_PACKAGE)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("hf:HuggingFaceTB/SmolLM2-135M", ModelSource("hf", "HuggingFaceTB/SmolLM2-135M", None)),
        ("hf:org/name@main", ModelSource("hf", "org/name", "main")),
        ("hf:org/name@0123abcd", ModelSource("hf", "org/name", "0123abcd")),
        ("hf:org/name@", ModelSource("hf", "org/name", None)),
    ],
)
def test_parse_source_hub_org_name_revision(source, expected) -> None:
    assert parse_source(source) == expected


@pytest.mark.parametrize("source", ["hf:gpt2", "hf:a/b/c", "hf:/name", "hf:org/", "hf:", "hf:@main"])
def test_parse_source_bad_hub_form_is_a_one_line_error(source) -> None:
    with pytest.raises(SourceError) as err:
        parse_source(source)
    message = _message(err)
    assert repr(source) in message and "hf:ORG/NAME" in message


def test_parse_source_mlflow_uri_is_left_to_the_task_layer() -> None:
    assert parse_source("models:/tiny@champion") == ModelSource("mlflow", "models:/tiny@champion")


def test_parse_source_missing_path(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(SourceError) as err:
        parse_source(str(missing))
    assert _message(err) == f"model path not found: {missing}"


def test_parse_source_file_that_is_not_gguf(tmp_path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(SourceError) as err:
        parse_source(str(weights))
    assert ".gguf" in _message(err) and str(weights) in str(err.value)


def test_parse_source_gguf_file_and_folder_resolve_to_absolute_paths(tmp_path, monkeypatch) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_source("m.gguf") == ModelSource("gguf", str((tmp_path / "m.gguf").resolve()))
    assert parse_source("ckpt") == ModelSource("dir", str((tmp_path / "ckpt").resolve()))
    assert parse_source("./ckpt/") == parse_source("ckpt")


def test_source_error_is_a_quantmill_error() -> None:
    assert issubclass(SourceError, QuantmillError)


# --------------------------------------------------------------------------- check_causal_lm


def test_check_causal_lm_accepts_the_tiny_llama(tiny) -> None:
    assert check_causal_lm(tiny) == "llama"


def test_check_causal_lm_rejects_a_non_causal_config(tmp_path) -> None:
    from transformers import T5Config

    folder = tmp_path / "t5"
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=32).save_pretrained(folder)
    with pytest.raises(SourceError) as err:
        check_causal_lm(folder)
    message = _message(err)
    assert "not a causal LM" in message and "'t5'" in message


def test_check_causal_lm_rejects_a_bert_config(tmp_path) -> None:
    from transformers import BertConfig

    folder = tmp_path / "bert"
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(folder)
    with pytest.raises(SourceError, match="not a causal LM"):
        check_causal_lm(folder)


def test_check_causal_lm_rejects_a_folder_without_config(tmp_path) -> None:
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(SourceError) as err:
        check_causal_lm(folder)
    assert "no config.json" in _message(err) and str(folder) in str(err.value)


def test_check_causal_lm_rejects_an_unreadable_config(tmp_path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(SourceError) as err:
        check_causal_lm(folder)
    assert "config.json" in _message(err)


# --------------------------------------------------------------------------- copy_checkpoint


def test_copy_checkpoint_copies_a_safetensors_checkpoint(tiny, tmp_path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    (src / "notes.md").write_text("not copied")
    (src / "extra").mkdir()
    dst = tmp_path / "copy"
    copy_checkpoint(src, dst)
    copied = sorted(p.name for p in dst.iterdir())
    assert "model.safetensors" in copied and "config.json" in copied and "tokenizer.json" in copied
    assert "notes.md" not in copied and "extra" not in copied
    for name in copied:
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(load_model(dst), ids), _logits(load_model(tiny), ids))


def test_copy_checkpoint_refuses_a_folder_without_weights(tiny, tmp_path) -> None:
    src = tmp_path / "config-only"
    src.mkdir()
    shutil.copy(tiny / "config.json", src)
    with pytest.raises(SourceError) as err:
        copy_checkpoint(src, tmp_path / "dst")
    assert "no weight files" in _message(err)
    assert not (tmp_path / "dst").exists()


@pytest.fixture(scope="module")
def pickle_checkpoint(tiny, tmp_path_factory) -> Path:
    """The tiny llama with only pytorch_model.bin (plus config and tokenizer)."""
    src = tmp_path_factory.mktemp("pickle") / "bin-only"
    model = load_model(tiny)
    model.save_pretrained(src, safe_serialization=False)
    if (src / "pytorch_model.bin").is_file():
        pass  # this transformers version still writes pickle weights
    else:  # transformers 5 ignores safe_serialization=False and writes safetensors
        for p in src.glob("*.safetensors"):
            p.unlink()
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, src)
    assert not list(src.glob("*.safetensors")) and (src / "pytorch_model.bin").is_file()
    return src


def test_copy_checkpoint_refuses_pickle_weights_without_allow_pickle(pickle_checkpoint, tmp_path) -> None:
    dst = tmp_path / "dst"
    with pytest.raises(SourceError) as err:
        copy_checkpoint(pickle_checkpoint, dst)
    message = _message(err)
    assert "--allow-pickle" in message and "pytorch_model.bin" in message
    assert not dst.exists()


def test_copy_checkpoint_with_allow_pickle_converts_to_safetensors_with_identical_logits(tiny, pickle_checkpoint, tmp_path) -> None:
    dst = tmp_path / "converted"
    copy_checkpoint(pickle_checkpoint, dst, allow_pickle=True)
    names = {p.name for p in dst.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names
    assert any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for n in names)
    assert check_causal_lm(dst) == "llama"
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(load_model(dst), ids), _logits(load_model(tiny), ids))
