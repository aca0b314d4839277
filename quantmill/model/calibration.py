"""Text sources and token packing for calibration and evaluation.

A dataset spec names where the text comes from:
  stdlib:calib | stdlib:eval    docstrings of the Python standard library, split by module into
                                two disjoint parts (offline, always available)
  file:PATH or a bare PATH      .txt (whole file), .jsonl (field "text", or PATH#FIELD),
                                .parquet (column "text", or PATH#COLUMN)
  hub:ID[:CONFIG]@SPLIT[#COLUMN] a dataset through `datasets.load_dataset` (hub id or local folder)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from quantmill.core.errors import DatasetError

STDLIB_PARTS = ("calib", "eval")


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # stdlib | file | hub
    target: str  # part name, path, or hub id
    column: str | None = None
    config: str | None = None
    split: str | None = None

    def describe(self) -> str:
        return {"stdlib": f"stdlib:{self.target}", "file": f"file:{self.target}"}.get(
            self.kind, f"hub:{self.target}"
        )


def parse_spec(spec: str) -> DatasetSpec:
    """Parse a dataset spec string; unknown forms are a one-line error."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        part = spec.partition(":")[2] or "calib"
        if part not in STDLIB_PARTS:
            raise DatasetError(f"unknown stdlib part {part!r} in dataset spec {spec!r} (use stdlib:calib or stdlib:eval)")
        return DatasetSpec("stdlib", part)
    if spec.startswith("hub:"):
        body, _, column = spec[4:].partition("#")
        ident, at, split = body.partition("@")
        if not ident or not at or not split:
            raise DatasetError(f"hub dataset spec {spec!r} must look like hub:ID[:CONFIG]@SPLIT[#COLUMN]")
        name, _, config = ident.partition(":")
        return DatasetSpec("hub", name, column or "text", config or None, split)
    path = spec[5:] if spec.startswith("file:") else spec
    path, _, column = path.partition("#")
    if Path(path).suffix not in (".txt", ".jsonl", ".parquet"):
        raise DatasetError(
            f"unknown dataset spec {spec!r} (use stdlib:calib, stdlib:eval, a .txt/.jsonl/.parquet path, or hub:ID@SPLIT)"
        )
    if not Path(path).is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return DatasetSpec("file", str(Path(path).resolve()), column or None)


def _module_docstrings(path: Path) -> str:
    """All docstrings of one module, in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                docs.append(doc)
    return "\n\n".join(docs)


def stdlib_modules() -> list[Path]:
    """Standard-library .py files (no tests, no site-packages), sorted for a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def stdlib_part(path: Path) -> str:
    """Deterministic calib/eval assignment by module path: the two parts never share a module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return "eval" if digest[0] % 2 else "calib"


@functools.lru_cache(maxsize=2)
def stdlib_text(part: str) -> str:
    """The docstrings of one part, module after module (parsed once per process)."""
    texts = (_module_docstrings(p) for p in stdlib_modules() if stdlib_part(p) == part)
    return "\n\n".join(t for t in texts if t)


def _read_file(spec: DatasetSpec) -> str:
    path = Path(spec.target)
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8", errors="replace")
    column = spec.column or "text"
    if path.suffix == ".jsonl":
        rows = []
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{path}:{lineno}: expected a JSON object with field {column!r}, got a JSON {type(record).__name__}")
            if column not in record:
                raise DatasetError(f"{path}:{lineno}: no field {column!r}")
            rows.append(str(record[column]))
        return "\n\n".join(rows)
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column not in table.column_names:
        raise DatasetError(f"{path}: no column {column!r} (columns: {', '.join(table.column_names)})")
    return "\n\n".join(str(v) for v in table.column(column).to_pylist() if v)


def _read_hub(spec: DatasetSpec) -> str:
    import datasets

    try:
        ds = datasets.load_dataset(spec.target, spec.config, split=spec.split)
    except Exception as err:  # datasets raises many types; the user needs the one line
        raise DatasetError(f"cannot load dataset {spec.target!r}: {str(err).splitlines()[0]}") from None
    if spec.column not in ds.column_names:
        raise DatasetError(f"dataset {spec.target!r} has no column {spec.column!r} (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(str(v) for v in list(ds[spec.column]) if v)


def load_text(spec: DatasetSpec) -> str:
    if spec.kind == "stdlib":
        return stdlib_text(spec.target)
    if spec.kind == "file":
        return _read_file(spec)
    return _read_hub(spec)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream (no special tokens: windows are cut from the middle)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def pack_samples(tokens: torch.Tensor, n: int, length: int, seed: int, what: str = "text") -> torch.Tensor:
    """N distinct non-overlapping windows of L tokens, chosen at random with `seed`: [N, L]."""
    windows = tokens.numel() // length
    if windows < n:
        raise DatasetError(
            f"{what} too short: {tokens.numel()} tokens, need {n} x {length} = {n * length}"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:n].sort().values
    return torch.stack([tokens[i * length : (i + 1) * length] for i in chosen.tolist()])


def tokenize_prefix(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The first n_tokens (at least) of the text's token stream, tokenizing only as much text as needed.

    A prefix is tokenized with a margin and grown until it yields n_tokens + 64 tokens, so the cut
    never changes the tokens kept (a boundary effect reaches back a token or two, not 64).
    """
    chars = max(n_tokens * 6, 4096)
    while True:
        ids = tokenize(tokenizer, text[:chars])
        if ids.numel() >= n_tokens + 64 or chars >= len(text):
            return ids
        chars *= 2


def first_windows(tokens: torch.Tensor, k: int, length: int, what: str = "text") -> torch.Tensor:
    """The first K non-overlapping windows of L tokens (the evaluation protocol): [K, L]."""
    if tokens.numel() < k * length:
        raise DatasetError(f"{what} too short: {tokens.numel()} tokens, need {k} x {length} = {k * length}")
    return tokens[: k * length].reshape(k, length)
