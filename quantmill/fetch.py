"""Fetching a registered quantized model: download, verify every file against the sha256 recorded
at registration, and only then put the folder where it was asked for.

The hashes come from the version's tags in the registry, never from a file shipped with the
download, so a changed artifact store cannot vouch for itself.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from quantmill.core.hashing import hash_files
from quantmill.tasks.registry import checkpoint_hashes
from quantmill.tasks.store import default_root
from quantmill.tasks.tracking import RegistryError, get_version, mlflow_module, tracking_uri


@dataclass
class Pulled:
    uri: str  # models:/NAME/VERSION (pinned, whatever alias was asked for)
    folder: Path
    files: int
    bytes: int

    def load_line(self) -> str:
        return f'AutoModelForCausalLM.from_pretrained("{self.folder}")'


def verify(folder: Path, expected: dict[str, str], uri: str) -> None:
    """Every recorded file present with its sha256, and nothing else; one line naming the first
    file that differs."""
    actual = hash_files(folder)
    for name in sorted(expected):
        if name not in actual:
            raise RegistryError(f"{uri}: file {name} is missing from the download")
        if actual[name] != expected[name]:
            raise RegistryError(f"{uri}: file {name} does not match the sha256 recorded at registration (artifact store changed?)")
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise RegistryError(f"{uri}: file {extra[0]} was not part of the registered version")


def _download_verified(uri: str, scratch: Path) -> tuple[str, Path, dict[str, str]]:
    version = get_version(uri)
    pinned = f"models:/{version.name}/{version.version}"
    expected = checkpoint_hashes(version.tags)
    if not expected:
        raise RegistryError(f"{pinned} has no recorded checkpoint hashes (registered by an older quantmill): it cannot be verified; re-register it")
    mlflow = mlflow_module()
    mlflow.set_tracking_uri(tracking_uri())
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(scratch)))
    except Exception as err:
        raise RegistryError(f"cannot download {pinned} from {tracking_uri()}: {str(err).splitlines()[0]}") from None
    # MLflow's models:/ download adds a note of which registered version it came from.
    (local / "registered_model_meta").unlink(missing_ok=True)
    verify(local, expected, pinned)
    return pinned, local, expected


def pull(uri: str, dst: str | Path, force: bool = False) -> Pulled:
    """Download `uri` into `dst`: built in a hidden folder beside it and renamed into place only
    once every file matches; an existing non-empty `dst` is replaced only with `force`."""
    dst = Path(dst).expanduser().absolute()
    if dst.exists() and not dst.is_dir():
        raise RegistryError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise RegistryError(f"{dst} is not empty: choose another folder or pass --force to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = dst.parent / f".{dst.name}.pull-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        pinned, local, expected = _download_verified(uri, scratch)
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        if dst.exists():
            dst.rename(old)
        os.replace(local, dst)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    size = sum((dst / name).stat().st_size for name in expected)
    return Pulled(pinned, dst, len(expected), size)


def cached_folder(name: str, version: str) -> Path:
    return default_root() / "models" / name / str(version)


def fetch_cached(uri: str) -> Path:
    """The verified folder of `uri` under $QUANTMILL_HOME/models/NAME/VERSION, downloaded on the
    first call only (a version never changes; sizes are re-checked on reuse)."""
    version = get_version(uri)
    folder = cached_folder(version.name, version.version)
    stamp = folder.with_name(f"{folder.name}.verified.json")
    if folder.is_dir() and stamp.is_file():
        sizes = json.loads(stamp.read_text())
        if all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in sizes.items()):
            return folder
    stamp.unlink(missing_ok=True)
    pulled = pull(f"models:/{version.name}/{version.version}", folder, force=True)
    stamp.write_text(json.dumps({n: (pulled.folder / n).stat().st_size for n in checkpoint_hashes(version.tags)}))
    return folder


def load(uri: str, dtype=None):
    """(model, tokenizer) of a registered version, hash-verified, cached locally by version."""
    # torch and transformers only when a model is loaded: `quantmill pull` needs neither.
    import torch

    from quantmill.io.checkpoint import load_quantized
    from quantmill.io.sources import load_tokenizer

    folder = fetch_cached(uri)
    model = load_quantized(folder, dtype=dtype or torch.float32).eval()
    return model, load_tokenizer(folder)
