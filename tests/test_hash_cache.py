"""Identities of local checkpoints hash each file once per (path, size, mtime, inode) (issue 16's
leftover: every run and every hourly scan re-hashed whole checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quantmill.core.errors import SourceError
from quantmill.core.hashing import sha256_file
from quantmill.tasks.hash_cache import cached_sha256
from tests.tiny import make_tiny_llama


def _rewrite_keeping_stamp(path: Path, data: bytes) -> None:
    """New bytes of the same length, in place (same inode), with the old modification time."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_remembered_hash_is_used_until_the_stamp_changes(home, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 1000)
    first = cached_sha256(f)
    assert first == sha256_file(f)
    _rewrite_keeping_stamp(f, b"b" * 1000)
    assert cached_sha256(f) == first  # not read again: the stamp is unchanged
    f.write_bytes(b"b" * 1001)
    assert cached_sha256(f) == sha256_file(f) != first


def test_a_stale_remembered_hash_is_caught_by_resolve_and_forgotten(home, tmp_path):
    from quantmill.tasks.resolve import resolve_model, source_identity

    model = make_tiny_llama(tmp_path / "m")
    before = source_identity(str(model))
    config = model / "config.json"
    text = config.read_bytes()
    _rewrite_keeping_stamp(config, text.replace(b'"hidden_act": "silu"', b'"hidden_act": "relu"'))
    assert source_identity(str(model)) == before  # the remembered hashes
    with pytest.raises(SourceError, match=r"config.json changed while the checkpoint was read; run again"):
        resolve_model.fn(str(model))
    assert not list((home / "resolve_model").glob("[0-9a-f]*"))  # nothing committed
    after = source_identity(str(model))
    assert after["files"]["config.json"] == sha256_file(config) != before["files"]["config.json"]
    assert resolve_model.fn(str(model))["key"]
