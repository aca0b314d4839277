"""Dataset specs, text readers and token packing for calibration and evaluation."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from quantmill.core.errors import DatasetError, QuantmillError
from quantmill.model.calibration import (
    DatasetSpec,
    _module_docstrings,
    first_windows,
    load_text,
    pack_samples,
    parse_spec,
    stdlib_modules,
    stdlib_part,
    tokenize,
)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# --------------------------------------------------------------------------- parse_spec


@pytest.mark.parametrize("spec, part", [("stdlib:calib", "calib"), ("stdlib:eval", "eval"), ("stdlib", "calib")])
def test_parse_spec_stdlib_parts(spec, part) -> None:
    parsed = parse_spec(spec)
    assert parsed == DatasetSpec("stdlib", part)
    assert parsed.describe() == f"stdlib:{part}"


@pytest.mark.parametrize("name", ["stdlib_notes.txt", "stdlib-eval"])
def test_parse_spec_only_stdlib_colon_means_the_stdlib(tmp_path, monkeypatch, name) -> None:
    monkeypatch.chdir(tmp_path)
    if name.endswith(".txt"):
        (tmp_path / name).write_text("my own corpus")
        assert parse_spec(name) == DatasetSpec("file", str((tmp_path / name).resolve()), None)
    else:
        with pytest.raises(DatasetError):
            parse_spec(name)


def test_parse_spec_unknown_stdlib_part_names_it() -> None:
    with pytest.raises(DatasetError) as err:
        parse_spec("stdlib:train")
    assert "'train'" in _one_line(err)


def test_parse_spec_bare_txt_path_is_a_resolved_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "corpus.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    parsed = parse_spec("corpus.txt")
    assert parsed == DatasetSpec("file", str((tmp_path / "corpus.txt").resolve()), None)
    assert parse_spec(f"file:{tmp_path / 'corpus.txt'}") == parsed
    assert parsed.describe() == f"file:{parsed.target}"


def test_parse_spec_jsonl_field_and_parquet_column(tmp_path) -> None:
    (tmp_path / "rows.jsonl").write_text('{"body": "x"}\n')
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "rows.parquet")
    assert parse_spec(f"{tmp_path}/rows.jsonl#body") == DatasetSpec("file", str(tmp_path / "rows.jsonl"), "body")
    assert parse_spec(f"{tmp_path}/rows.jsonl").column is None
    assert parse_spec(f"{tmp_path}/rows.parquet#content") == DatasetSpec("file", str(tmp_path / "rows.parquet"), "content")


def test_parse_spec_hub_id_config_split_column() -> None:
    assert parse_spec("hub:wikitext:wikitext-2-raw-v1@test#text") == DatasetSpec(
        "hub", "wikitext", "text", "wikitext-2-raw-v1", "test"
    )
    assert parse_spec("hub:org/name@train") == DatasetSpec("hub", "org/name", "text", None, "train")
    assert parse_spec("hub:/abs/folder@validation#body") == DatasetSpec("hub", "/abs/folder", "body", None, "validation")
    assert parse_spec("hub:org/name@train").describe() == "hub:org/name"


@pytest.mark.parametrize("spec", ["hub:wikitext", "hub:@train", "hub:wikitext@"])
def test_parse_spec_hub_without_split_is_an_error(spec) -> None:
    with pytest.raises(DatasetError) as err:
        parse_spec(spec)
    assert spec in _one_line(err)


@pytest.mark.parametrize("spec", ["wikitext", "corpus.csv", "s3://bucket/x", "file:notes.md"])
def test_parse_spec_unknown_spec_is_a_one_line_error_naming_it(spec) -> None:
    with pytest.raises(DatasetError) as err:
        parse_spec(spec)
    assert repr(spec) in _one_line(err)


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl#text", "missing.parquet"])
def test_parse_spec_missing_file_is_an_error(tmp_path, name) -> None:
    with pytest.raises(DatasetError) as err:
        parse_spec(f"{tmp_path}/{name}")
    message = _one_line(err)
    assert "not found" in message and str(tmp_path / name.partition("#")[0]) in message


def test_dataset_error_is_a_quantmill_error() -> None:
    assert issubclass(DatasetError, QuantmillError)


# --------------------------------------------------------------------------- stdlib text


def _part_text_until(part: str, modules: list[Path], at_least: int) -> tuple[str, int]:
    """Docstrings of the part's modules in stdlib order, stopping once `at_least` characters are seen."""
    texts, total, used = [], 0, 0
    for path in modules:
        if stdlib_part(path) != part:
            continue
        text = _module_docstrings(path)
        used += 1
        if text:
            texts.append(text)
            total += len(text)
        if total > at_least:
            break
    return "\n\n".join(texts), used


def test_stdlib_calib_and_eval_share_no_module_and_both_are_large() -> None:
    modules = stdlib_modules()
    assert len(modules) > 200
    assert modules == sorted(modules)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(p.suffix == ".py" and p.is_relative_to(root) for p in modules)
    assert not any(part in ("test", "tests", "site-packages", "__pycache__") for p in modules for part in p.relative_to(root).parts)
    parts = {p: stdlib_part(p) for p in modules}
    assert set(parts.values()) == {"calib", "eval"}
    calib = {p for p, part in parts.items() if part == "calib"}
    evaluation = {p for p, part in parts.items() if part == "eval"}
    assert not calib & evaluation and calib | evaluation == set(modules)
    assert min(len(calib), len(evaluation)) > len(modules) // 4  # a balanced split, not a token one
    assert [stdlib_part(p) for p in modules] == list(parts.values())  # deterministic
    # Each part's text (stdlib_text concatenates all of it) is well over 100k characters.
    for part in ("calib", "eval"):
        text, _ = _part_text_until(part, modules, 100_000)
        assert len(text) > 100_000, part


# --------------------------------------------------------------------------- packing


def test_pack_samples_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    tokens = torch.arange(2000)
    a = pack_samples(tokens, 8, 32, seed=0)
    assert a.shape == (8, 32) and a.dtype == tokens.dtype
    assert torch.equal(a, pack_samples(tokens, 8, 32, seed=0))
    assert not torch.equal(a, pack_samples(tokens, 8, 32, seed=1))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_pack_samples_windows_are_non_overlapping_slices_of_the_stream(seed) -> None:
    length = 16
    tokens = torch.arange(1000) * 3 + 5  # any stream: rows must be its aligned contiguous slices
    rows = pack_samples(tokens, 10, length, seed=seed)
    starts = []
    for row in rows:
        start = int((row[0] - 5) // 3)
        assert start % length == 0
        assert torch.equal(row, tokens[start : start + length])
        starts.append(start)
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(b - a >= length for a, b in zip(starts, starts[1:]))


def test_pack_samples_can_take_every_window() -> None:
    tokens = torch.arange(64)
    assert torch.equal(pack_samples(tokens, 4, 16, seed=3), tokens.reshape(4, 16))


def test_pack_samples_too_short_names_the_token_counts() -> None:
    with pytest.raises(DatasetError) as err:
        pack_samples(torch.arange(50), 4, 16, seed=0, what="stdlib:calib")
    message = _one_line(err)
    assert "stdlib:calib" in message and "50" in message and "64" in message and "4 x 16" in message


def test_first_windows_are_the_leading_slices() -> None:
    tokens = torch.arange(100)
    assert torch.equal(first_windows(tokens, 3, 10), torch.arange(30).reshape(3, 10))
    assert torch.equal(first_windows(tokens, 10, 10), tokens.reshape(10, 10))
    with pytest.raises(DatasetError) as err:
        first_windows(tokens, 11, 10, what="eval text")
    message = _one_line(err)
    assert "eval text" in message and "100" in message and "110" in message


# --------------------------------------------------------------------------- readers


def test_txt_reader_returns_the_whole_file(tmp_path) -> None:
    text = "line one\nline two\n\nüñíçødé\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    assert load_text(parse_spec(str(tmp_path / "a.txt"))) == text


def test_jsonl_reader_joins_the_field_and_skips_blank_lines(tmp_path) -> None:
    rows = [{"text": "first", "body": "b1"}, {"text": "second", "body": "b2"}]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert load_text(parse_spec(str(path))) == "first\n\nsecond"
    assert load_text(parse_spec(f"{path}#body")) == "b1\n\nb2"


def test_jsonl_reader_missing_field_names_line_and_field(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"other": "b"}\n')
    with pytest.raises(DatasetError) as err:
        load_text(parse_spec(str(path)))
    assert f"{path}:2" in _one_line(err) and "'text'" in str(err.value)


def test_jsonl_reader_bad_json_names_the_line(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(DatasetError) as err:
        load_text(parse_spec(str(path)))
    assert f"{path}:2" in _one_line(err)


def test_parquet_reader_joins_the_column_and_skips_empty_values(tmp_path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "", "beta"], "content": ["c1", "c2", "c3", "c4"]}), path)
    assert load_text(parse_spec(str(path))) == "alpha\n\nbeta"
    assert load_text(parse_spec(f"{path}#content")) == "c1\n\nc2\n\nc3\n\nc4"


def test_parquet_reader_missing_column_lists_the_columns(tmp_path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), path)
    with pytest.raises(DatasetError) as err:
        load_text(parse_spec(str(path)))
    message = _one_line(err)
    assert "'text'" in message and "content, id" in message


@pytest.fixture
def hub_folder(tmp_path, monkeypatch) -> Path:
    """A local dataset folder holding one parquet file; datasets' cache kept inside tmp_path."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    folder = tmp_path / "local-dataset"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["hub one", "hub two", ""], "body": ["b1", "b2", "b3"]}), folder / "train.parquet")
    return folder


def test_hub_spec_on_a_local_folder_loads_through_datasets(hub_folder) -> None:
    spec = parse_spec(f"hub:{hub_folder}@train#text")
    assert spec == DatasetSpec("hub", str(hub_folder), "text", None, "train")
    assert load_text(spec) == "hub one\n\nhub two"
    assert load_text(parse_spec(f"hub:{hub_folder}@train#body")) == "b1\n\nb2\n\nb3"
    with pytest.raises(DatasetError) as err:
        load_text(parse_spec(f"hub:{hub_folder}@train#missing"))
    assert "'missing'" in _one_line(err) and "text, body" in str(err.value)


def test_hub_spec_on_a_folder_without_data_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as err:
        load_text(parse_spec(f"hub:{empty}@train"))
    assert "cannot load dataset" in _one_line(err) and str(empty) in str(err.value)


# --------------------------------------------------------------------------- tokenize


def test_tokenize_is_one_stream_without_special_tokens() -> None:
    from tests.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    ids = tokenize(tokenizer, "abc abc")
    assert ids.dtype == torch.long and ids.shape == (7,)  # byte-level: one id per byte
    assert ids[0] == ids[4] and ids[1] == ids[5]
    assert tokenizer.decode(ids.tolist()) == "abc abc"


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"text": "a"}\n{not json\n', "2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (b'{"text": "a"}\n\n7\n', "3: expected a JSON object with field 'text', got a JSON int"),
        (b'{"text": "a"}\n{"text": "caf\xe9"}\n', "2: not UTF-8 text (byte 0xe9)"),
    ],
)
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, body, message) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(body)
    with pytest.raises(DatasetError) as err:
        load_text(parse_spec(str(path)))
    assert _one_line(err) == f"{path}:{message}"
