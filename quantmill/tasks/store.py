"""The stage store: content-addressed, atomic directories under $QUANTMILL_HOME.

Layout: <root>/<stage>/<key>/ with manifest.json written last. An entry without a manifest does
not exist. Work is built in <root>/<stage>/.tmp-<key>-<pid>/ and renamed into place.

A killed run leaves at most such a folder (a *partial*). It stays until a run of the same key
adopts it (so per-layer partial results resume: hours on a large model) or the user collects it
(`quantmill store gc`); another key's build never touches it. Adoption and collection both start
with an atomic rename of the folder, so exactly one process gets it.

$QUANTMILL_HOME may also be an s3:// URL (a store shared by hosts). Then `root` is a local
read-through cache of it with the same layout: builds, partials and locks stay local, `commit`
uploads the entry (manifest last) before renaming it into the cache, and `get` downloads an
entry the cache lacks once, into a `.dl-` folder renamed into place (quantmill/tasks/store_remote.py).
`exclusive` gives one run at a time the right to build an entry (quantmill/tasks/lease.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantmill.core.errors import QuantmillError
from quantmill.core.hashing import canonical_json, sha256_text
from quantmill.tasks.lease import DEFAULT_LEASE_S, file_lock
from quantmill.tasks.processes import pid_alive
from quantmill.tasks.store_remote import FILES, RemoteStore, cache_root, files_of, is_remote, local_path, manifest_files

# Bump a stage's version when its output for the same inputs changes: old entries stop matching.
STAGE_VERSIONS = {
    "resolve_model": "1",
    "capture_calibration": "1",
    "collect_stats": "1",
    "quantize": "1",
    "evaluate": "2",  # 2: per-window values, paired intervals, the float model's reference record
}

MANIFEST = "manifest.json"
PARTIAL = "partial"  # the per-block results of a resumable stage, inside its tmp folder
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DOWNLOAD_PREFIX = ".dl-"  # an entry being downloaded into the cache: .dl-<key>-<thread>-<pid>
HANDOVER_S = 5.0  # how long a build under `exclusive` waits for the dead previous holder's pid to go
LOCKS = ".locks"  # exclusive(): <root>/.locks/<stage>/<key>, removed by its holder (outside the stage folders)


class StoreError(QuantmillError):
    """A store entry that cannot be read (a corrupt manifest): names the entry and what to do."""


def home() -> str:
    """$QUANTMILL_HOME as given: a local path, or a URL (s3://BUCKET/PREFIX)."""
    return os.environ.get("QUANTMILL_HOME") or str(Path.home() / ".cache" / "quantmill")


def default_root() -> Path:
    """The store's local folder: $QUANTMILL_HOME, or the read-through cache of a remote store
    (also where the local-only state lives: file hashes, downloads, pending registrations)."""
    value = home()
    return cache_root(value) if is_remote(value) else local_path(value)


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


@dataclass
class Partial:
    """The build folder of a run that is still going (owner alive) or was killed (owner dead)."""

    stage: str
    key: str
    pid: int
    path: Path
    alive: bool

    def blocks_done(self) -> int:
        """Decoder blocks finished (from the sequential engine's progress marker); 0 if none."""
        try:
            return int(json.loads((self.path / PARTIAL / "progress.json").read_text())["done"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            return 0


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def folder_size(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 if it vanished meanwhile)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def last_modified(folder: Path) -> float:
    """The newest mtime under `folder`: when its owner last wrote to it."""
    newest = 0.0
    for dirpath, _, files in os.walk(folder):
        for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(p).st_mtime)
    return newest


def _parse_tmp_name(name: str) -> tuple[str, int] | None:
    """`.tmp-<key>-<pid>` -> (key, pid); None for anything else (never touched)."""
    if not name.startswith(TMP_PREFIX):
        return None
    key, _, pid = name[len(TMP_PREFIX) :].rpartition("-")
    return (key, int(pid)) if key and pid.isdigit() else None


def remove_tree(path: Path) -> bool:
    """Claim `path` with an atomic rename, then delete it: a concurrent adopter or collector that
    renamed it first wins, and nothing is deleted under its feet. False if it was gone."""
    trash = path.parent / f"{TRASH_PREFIX}{os.getpid()}-{time.monotonic_ns()}-{path.name}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


@contextlib.contextmanager
def _stage_lock(stage_dir: Path) -> Iterator[None]:
    """An exclusive flock on the stage folder itself (no lock file to leave behind)."""
    fd = os.open(stage_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Store:
    def __init__(self, root: str | Path | None = None) -> None:
        """`root`: a local folder or a remote URL (default $QUANTMILL_HOME)."""
        location = str(root) if root is not None else home()
        self.remote = RemoteStore(location) if is_remote(location) else None
        self.root = cache_root(location) if self.remote is not None else local_path(location)
        self._held: set[tuple[str, str]] = set()  # the (stage, key)s this Store's `exclusive` holds

    @property
    def location(self) -> str:
        """Where the entries are, in words: the URL of a remote store, else the local root."""
        return self.remote.url if self.remote is not None else str(self.root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Entry | None:
        """The finished entry, local (in the cache of a remote store: downloaded once), or None."""
        entry = self.get_local(stage, key)
        if entry is not None or self.remote is None:
            return entry
        data = self.remote.manifest(stage, key)
        return None if data is None else self._download(stage, key, data)

    def _download(self, stage: str, key: str, data: bytes) -> Entry:
        """A remote entry into the cache: files into a private folder, checked against the
        manifest, the manifest last, one rename (a concurrent download of it keeps the first)."""
        manifest, files = manifest_files(data, f"{self.location} entry {stage}/{key[:12]}")
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = final.parent / f"{DOWNLOAD_PREFIX}{key}-{threading.get_ident()}-{os.getpid()}"  # threads of one run too
        shutil.rmtree(folder, ignore_errors=True)
        try:
            self.remote.download(stage, key, files, folder)
            (folder / MANIFEST).write_bytes(data)
            _fsync_tree(folder)
            with _stage_lock(final.parent):
                existing = self.get_local(stage, key)
                if existing is None:
                    if final.exists():
                        remove_tree(final)
                    os.rename(folder, final)
                    return Entry(stage, key, final, manifest)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return existing

    def get_local(self, stage: str, key: str) -> Entry | None:
        """The entry if the local folder (a remote store's cache) has it; never downloads."""
        folder = self.path(stage, key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            return None
        try:
            data = json.loads(manifest.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as err:
            raise StoreError(f"store entry {stage}/{key[:12]} has a corrupt {MANIFEST} ({str(err).splitlines()[0]}): delete {folder} and re-run") from None
        return Entry(stage, key, folder, data)

    # ----------------------------------------------------------------- listing

    def stages(self) -> list[str]:
        if not self.root.is_dir():
            return []
        present = {p.name for p in self.root.iterdir() if p.is_dir()}
        return [stage for stage in STAGE_VERSIONS if stage in present]  # in pipeline order

    def entries(self, stage: str) -> list[Path]:
        """Folders of finished entries (a manifest inside), by key."""
        stage_dir = self.root / stage
        if not stage_dir.is_dir():
            return []
        return sorted(p for p in stage_dir.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())

    def partials(self, stage: str) -> list[Partial]:
        """Build folders (live or dead owners) in a stage, newest first."""
        stage_dir = self.root / stage
        if not stage_dir.is_dir():
            return []
        found = []
        for tmp in stage_dir.iterdir():
            parsed = _parse_tmp_name(tmp.name)
            if parsed is not None and tmp.is_dir():
                found.append(Partial(stage, parsed[0], parsed[1], tmp, pid_alive(parsed[1])))
        return sorted(found, key=lambda p: last_modified(p.path), reverse=True)

    def collect(self, older_than_s: float, now: float | None = None) -> list[Partial]:
        """Remove dead owners' partials not written to for `older_than_s` seconds (`store gc`),
        and what a killed deletion or download left behind (`.trash-<pid>-...`, `.dl-...-<pid>`
        of a dead process)."""
        now = time.time() if now is None else now
        removed = []
        for stage in self.stages():
            for p in self.partials(stage):
                if not p.alive and now - last_modified(p.path) >= older_than_s and remove_tree(p.path):
                    removed.append(p)
            for trash in (self.root / stage).glob(f"{TRASH_PREFIX}*"):
                pid = trash.name[len(TRASH_PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(trash, ignore_errors=True)
            for download in (self.root / stage).glob(f"{DOWNLOAD_PREFIX}*"):  # a killed download
                pid = download.name.rpartition("-")[2]
                if pid.isdigit() and not pid_alive(int(pid)):
                    shutil.rmtree(download, ignore_errors=True)
        return removed

    # ----------------------------------------------------------------- building

    def _adopt(self, stage: str, key: str, tmp: Path, wait_s: float = 0.0) -> bool:
        """Take over the newest dead partial of the same key (rename: only one process wins).

        `wait_s`: how long a same-key partial whose owner still looks alive is waited for. Under
        `exclusive` such an owner is the previous holder, dying: the kernel frees a killed
        process's lock while it exits, a moment before its pid is gone.
        """
        deadline = time.monotonic() + wait_s
        while True:
            same = [p for p in self.partials(stage) if p.key == key and p.path != tmp]
            for p in same:
                if not p.alive:
                    try:
                        os.rename(p.path, tmp)
                    except OSError:  # another run adopted or collected it first
                        continue
                    return True
            if not any(p.alive for p in same) or time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    @contextlib.contextmanager
    def build(self, stage: str, key: str) -> Iterator[Path]:
        """A private folder to build the entry in; committed atomically when the block ends.

        The block writes its files, then `commit` below writes the manifest and renames. If the
        block raises a QuantmillError (bad input) the folder is removed; on any other failure only
        its `partial/` folder (per-block results of a resumable stage) stays, for a resume by the
        next run of the same key, and everything else (a half-written checkpoint on a full disk)
        is removed.
        """
        tmp = self.root / stage / f"{TMP_PREFIX}{key}-{os.getpid()}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if not tmp.exists():
            self._adopt(stage, key, tmp, HANDOVER_S if (stage, key) in self._held else 0.0)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
        except QuantmillError:
            self.discard(tmp)  # bad input: nothing to resume, nothing left behind
            raise
        except BaseException:
            self._keep_partial_only(tmp)
            raise

    def _keep_partial_only(self, tmp: Path) -> None:
        partial = tmp / PARTIAL
        if not partial.is_dir() or not any(partial.iterdir()):
            self.discard(tmp)
            return
        for child in tmp.iterdir():
            if child.name != PARTIAL:
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        child.unlink()

    def commit(self, tmp: Path, stage: str, key: str, manifest: dict[str, Any]) -> Entry:
        """Write the manifest last, fsync, and rename the folder into place.

        The check-and-rename runs under an exclusive lock on the stage folder, so a slower
        concurrent writer of the same key sees the faster one's entry and keeps it (never removes it).
        A remote store gets the entry first (its manifest lists the files with their sizes); if it
        had the entry already, ours is dropped and theirs is the one the cache holds.
        """
        manifest = {"stage": stage, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **manifest}
        scratch = tmp / PARTIAL
        if scratch.exists():
            shutil.rmtree(scratch)
        if self.remote is not None:
            manifest[FILES] = files_of(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _fsync_tree(tmp)
        if self.remote is not None and not self.remote.publish(tmp, stage, key):
            shutil.rmtree(tmp, ignore_errors=True)  # another host finished first: keep its entry
            entry = self.get(stage, key)
            if entry is None:
                raise StoreError(f"store entry {stage}/{key[:12]} vanished from {self.location} while committing: re-run")
            return entry
        final = self.path(stage, key)
        with _stage_lock(final.parent):
            existing = self.get_local(stage, key)
            if existing is None:
                if final.exists():  # a folder without a manifest is not an entry: replace it
                    remove_tree(final)
                os.rename(tmp, final)
                return Entry(stage, key, final, manifest)
        shutil.rmtree(tmp, ignore_errors=True)  # another run finished first: its entry is as good as ours
        return existing

    @contextlib.contextmanager
    def exclusive(self, stage: str, key: str, lease_s: float = DEFAULT_LEASE_S, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """The right to build (stage, key): blocks while another live run holds it; `on_wait`
        (a run logger, say) hears one line when it has to wait.

        Pattern: `get` -> None -> `with exclusive(...)`: `get` again (the holder may have just
        committed it) -> still None -> `build` + `commit`. On one host an flock (released by the
        kernel when its holder dies); with a remote store also a lease in the bucket, renewed in
        the background, that a waiter takes over once it went `lease_s` without renewal.
        """
        def waiting(where: str) -> Callable[[], None] | None:
            if on_wait is None:
                return None
            return lambda: on_wait(f"waiting for the run that is building {stage} {key[:12]} ({where})")

        with file_lock(self.root / LOCKS / stage / key, waiting("on this host")):
            self._held.add((stage, key))
            try:
                if self.remote is None:
                    yield
                else:
                    lease = self.remote.lease(stage, key, lease_s)
                    with lease.held(waiting(f"on another host: lease {lease_s:.0f} s")):
                        yield
            finally:
                self._held.discard((stage, key))

    @contextlib.contextmanager
    def claim(self, stage: str, key: str, lease_s: float = DEFAULT_LEASE_S, on_wait: Callable[[str], None] | None = None) -> Iterator[Entry | None]:
        """The entry, or the right to build it: the `exclusive` pattern in one block.

        `with store.claim(stage, key) as found:` yields the entry when it exists (at once, or once
        the run that held the right committed it), else None while holding `exclusive`, for the
        block to `build` and `commit`.
        """
        found = self.get(stage, key)
        if found is not None:
            yield found
            return
        with self.exclusive(stage, key, lease_s, on_wait):
            yield self.get(stage, key)

    def discard(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
