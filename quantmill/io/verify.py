"""Checkpoint verification: refuse a broken float checkpoint before it becomes a store entry.

transformers initialises missing tensors randomly at every load and pads nothing it cannot read
until the first forward pass, so a checkpoint missing a decoder layer "works": stats, quantize and
evaluate each see a different random model (top-1 agreement 0.30 instead of 0.98). Checked here:

- cheap (headers only, before any work): every safetensors file parses and holds the bytes its
  header describes; every parameter of the architecture (a meta-device instance of config.json,
  no memory) is present with its shape and kind of dtype; tokenizer files are present.
- full (before the resolve stage commits): the above, every value finite, and the tokenizer loads.

Refusals are one line naming the file and the tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from quantmill.core.errors import SourceError

# Files one of which a tokenizer needs (fast: tokenizer.json; sentencepiece: *.model; BPE: vocab.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_KIND = {torch.float64: "float", torch.float32: "float", torch.float16: "float", torch.bfloat16: "float"}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors' name: F32, BF16, I64, ...
    shape: tuple[int, ...]


def _list(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, after checking the file holds all their bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{path}: not a safetensors file ({size} bytes, shorter than a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise SourceError(f"{path}: not a safetensors file (header length {n} does not fit in its {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise SourceError(f"{path}: not a safetensors file (its header is not JSON)") from None
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            tensors[name] = TensorInfo(path.name, str(info["dtype"]), tuple(int(d) for d in info["shape"]))
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: tensor {name} has a malformed header entry") from None
        end = max(end, int(stop))
    have = size - 8 - n
    if end > have:
        raise SourceError(f"{path}: truncated (its header describes {end} bytes of tensor data, the file holds {have})")
    return tensors


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the folder's safetensors files (and the shards its index names must exist)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SourceError(f"{index}: not a valid safetensors index (no weight_map)") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise SourceError(f"{folder}: shard(s) {_list(missing)} named in {index.name} are missing")
    tensors: dict[str, TensorInfo] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(read_header(path))
    return tensors


def expected_parameters(folder: Path) -> dict[str, tuple[tuple[int, ...], str, tuple[str, ...]]]:
    """name -> (shape, dtype kind, names it is tied to) of every persistent tensor of the
    architecture in config.json, from a meta-device instance (no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ties: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        ties.setdefault(id(p), []).append(name)
    tied = {name: tuple(group) for group in ties.values() for name in group}
    # Hub checkpoints of some architectures (gpt2, opt) name tensors without the base model's
    # prefix (`h.0...` for `transformer.h.0...`); transformers accepts both, and so do we.
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else None
    out = {}
    for name, t in model.state_dict().items():
        names = tied.get(name, (name,))
        if prefix:
            names += tuple(n[len(prefix) :] for n in names if n.startswith(prefix))
        out[name] = (tuple(t.shape), _KIND.get(t.dtype, "other"), names)
    return out


def check_tensors(folder: Path, label: str | None = None) -> dict[str, TensorInfo]:
    """Headers against the architecture: nothing missing, shapes equal, float tensors stored as floats."""
    label = label or str(folder)
    tensors = checkpoint_tensors(folder)
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        return tensors  # a quantized checkpoint (a registered result as source): its layout is the quantizer's
    expected = expected_parameters(folder)
    missing = sorted(n for n, (_, _, group) in expected.items() if not any(g in tensors for g in group))
    if missing:
        raise SourceError(f"{label}: {len(missing)} tensor(s) of the architecture missing from the checkpoint: {_list(missing)} (transformers would fill them with random values)")
    for name, (shape, kind, names) in expected.items():
        info = next((tensors[n] for n in names if n in tensors), None)  # under its own name, a tied one or unprefixed
        if info is None:
            continue
        if info.shape != shape:
            raise SourceError(f"{label}: tensor {name} in {info.file} has shape {list(info.shape)}, the architecture needs {list(shape)}")
        if kind == "float" and info.dtype not in _FLOAT_DTYPES:
            raise SourceError(f"{label}: tensor {name} in {info.file} is {info.dtype}, the architecture needs a float tensor")
    return tensors


def check_tokenizer_files(folder: Path, label: str | None = None) -> None:
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise SourceError(f"{label or folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): copy the model's tokenizer next to config.json")


def check_headers(folder: Path, label: str | None = None) -> None:
    """The cheap checks: headers only, before any work starts."""
    check_tensors(folder, label)
    check_tokenizer_files(folder, label)


def _nonfinite(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(part)).sum()) for part in flat.split(chunk))


def verify_checkpoint(folder: Path, label: str | None = None) -> None:
    """The full check before a checkpoint is committed: headers, finite values, a loadable tokenizer."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    label = label or str(folder)
    check_headers(folder, label)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                bad = _nonfinite(f.get_tensor(name))
                if bad:
                    raise SourceError(f"{label}: tensor {name} in {path.name} has {bad} non-finite value(s) (NaN or inf)")
    try:
        AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # tokenizers raise many types for broken files
        raise SourceError(f"{label}: the tokenizer does not load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
