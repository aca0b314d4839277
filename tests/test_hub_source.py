"""`hf:ORG/NAME[@REV]` through huggingface_hub's real snapshot code, from an offline hub cache
laid out as huggingface_hub lays it (this machine has no hub access; the code path is the same)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from quantmill.core.errors import SourceError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, tiny_model, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_source_resolves_the_revision_to_a_commit(hub_cache, home):
    from quantmill.tasks.resolve import resolve_model

    entry = resolve_model.fn("hf:acme/tiny-llama")
    assert entry["manifest"]["resolved_revision"] == COMMIT
    assert (Path(entry["path"]) / "checkpoint" / "model.safetensors").is_file()
    assert entry["manifest"]["identity"] == {"kind": "hf", "repo": "acme/tiny-llama", "revision": COMMIT}  # the branch's commit, not "main"
    assert entry["manifest"]["requested_revision"] == "main"


def test_unknown_hub_repo_is_a_one_line_error(hub_cache, home):
    from quantmill.io.sources import download_hub

    with pytest.raises(SourceError, match="cannot fetch hf:acme/missing@main"):
        download_hub("acme/missing", None, home / "x")
