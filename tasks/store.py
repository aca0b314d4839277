"""The stage store: content-addressed, atomic directories under $QUANTMILL_HOME.

Layout: <root>/<stage>/<key>/ with manifest.json written last. An entry without a manifest does
not exist. Work is built in <root>/<stage>/.tmp-<key>-<pid>/ and renamed into place; a killed run
leaves at most such a folder, which the next run for the same key adopts (so per-layer partial
results resume) and which any run removes once its owner is dead and it is not adopted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quant.errors import QuantmillError
from quant.hashing import canonical_json, sha256_text

# Bump a stage's version when its output for the same inputs changes: old entries stop matching.
STAGE_VERSIONS = {
    "resolve_model": "1",
    "capture_calibration": "1",
    "collect_stats": "1",
    "quantize": "1",
    "evaluate": "1",
}

MANIFEST = "manifest.json"


def default_root() -> Path:
    return Path(os.environ.get("QUANTMILL_HOME", Path.home() / ".cache" / "quantmill")).expanduser()


def stage_key(stage: str, params: dict[str, Any], inputs: dict[str, str] | None = None) -> str:
    """sha256 over the stage, its code version, its parameters and its inputs' keys."""
    body = {"stage": stage, "version": STAGE_VERSIONS[stage], "params": params, "inputs": inputs or {}}
    return sha256_text(canonical_json(body))


@dataclass
class Entry:
    """A finished store entry: where it is and what its manifest says."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


class Store:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Entry | None:
        folder = self.path(stage, key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return None
        return Entry(stage, key, folder, json.loads(manifest.read_text()))

    def _stale_tmps(self, stage: str) -> Iterator[tuple[Path, str, int]]:
        stage_dir = self.root / stage
        if not stage_dir.is_dir():
            return
        for tmp in stage_dir.glob(".tmp-*"):
            key, _, pid = tmp.name[len(".tmp-") :].rpartition("-")
            if pid.isdigit() and not _pid_alive(int(pid)):
                yield tmp, key, int(pid)

    @contextlib.contextmanager
    def build(self, stage: str, key: str) -> Iterator[Path]:
        """A private folder to build the entry in; committed atomically when the block ends.

        The block writes its files, then `commit` below writes the manifest and renames. If the
        block raises, the folder stays for a resume by the next run of the same key.
        """
        tmp = self.root / stage / f".tmp-{key}-{os.getpid()}"
        adopted = False
        for stale, stale_key, _ in self._stale_tmps(stage):
            if stale_key == key and not adopted and not tmp.exists():
                stale.rename(tmp)  # resume its partial results
                adopted = True
            else:
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        except QuantmillError:
            self.discard(tmp)  # bad input: nothing to resume, nothing left behind
            raise

    def commit(self, tmp: Path, stage: str, key: str, manifest: dict[str, Any]) -> Entry:
        """Write the manifest last, fsync, and rename the folder into place."""
        manifest = {"stage": stage, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
        scratch = tmp / "partial"
        if scratch.exists():
            shutil.rmtree(scratch)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _fsync_tree(tmp)
        final = self.path(stage, key)
        existing = self.get(stage, key)
        if existing is not None:  # another run finished first: its entry is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
        if final.exists():  # a folder without a manifest is not an entry: replace it
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # a concurrent run renamed its entry into place between our checks
            shutil.rmtree(tmp, ignore_errors=True)
            winner = self.get(stage, key)
            if winner is None:
                raise
            return winner
        return Entry(stage, key, final, manifest)

    def discard(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
