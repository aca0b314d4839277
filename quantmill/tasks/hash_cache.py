"""sha256 of local checkpoint files, remembered by (path, size, mtime, inode).

A source's identity is the hash of every file in it, computed at every run and at every hourly
scan of a watched folder: hours per pass on a 70B checkpoint. Like git's index, a file whose
path, size, modification time (ns) and inode are unchanged is taken to have the hash computed
last time; any change to them hashes it again. Only identities use this; `quantmill pull` and
the registry's verification always read the bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantmill.core.hashing import sha256_file, sha256_text
from quantmill.tasks.store import default_root

CACHE = "file-hashes"


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


def cached_sha256(path: str | Path, root: Path | None = None) -> str:
    path = Path(path).resolve()
    record = (root or default_root()) / CACHE / f"{sha256_text(str(path))[:32]}.json"
    stamp = _stamp(path)
    try:
        known = json.loads(record.read_text())
        if known.get("path") == str(path) and known.get("stamp") == stamp:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    if _stamp(path) == stamp:  # not written to while it was read: safe to remember
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}))
            os.replace(tmp, record)
        except OSError:
            pass  # a read-only store still hashes, only slower
    return digest



def forget(path: str | Path, root: Path | None = None) -> None:
    """Drop what is remembered about `path` (its bytes changed under an unchanged stamp)."""
    resolved = Path(path).resolve()
    ((root or default_root()) / CACHE / f"{sha256_text(str(resolved))[:32]}.json").unlink(missing_ok=True)
