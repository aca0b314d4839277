"""The right to build one store entry, so two runs that need the same stage compute it once.

On one host: an flock on a lock file; the kernel releases it when its holder dies, even by
SIGKILL. Across hosts (an s3:// store): a lease object in the bucket, created with S3's
conditional write `If-None-Match: *` (exactly one creator wins) and renewed by a background
thread with `If-Match: <etag>`. A waiter never compares clocks: it watches the lease's ETag,
and one that has not changed for `lease_s` by the waiter's own monotonic clock belongs to a holder
that stopped renewing (dead, or cut off); the waiter takes it over with `If-Match` on that ETag,
so of several waiters exactly one succeeds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from quantmill.core.errors import QuantmillError
from quantmill.tasks.processes import owner_id

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 60.0  # renewed every lease_s / 3; a dead holder blocks others for about this long


class LeaseError(QuantmillError):
    """A lease that cannot be read or written (credentials, endpoint, bucket): names it."""


def _lock(fd: int, on_wait: Callable[[], None] | None) -> None:
    """flock, telling `on_wait` first when another holder makes us wait."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_wait is not None:
            on_wait()
        fcntl.flock(fd, fcntl.LOCK_EX)


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive flock on `path`, removed on release; `on_wait()` is called if it must wait.

    Removing the file while holding the lock is safe: a waiter that opened the old file gets its
    lock, sees the path no longer names its file (other inode, or gone) and tries again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            _lock(fd, on_wait)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)  # closing releases the lock


class S3Lease:
    """A lease object at `path` on an s3fs filesystem (see the module docstring for the protocol)."""

    def __init__(self, fs: Any, path: str, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.fs, self.path, self.lease_s = fs, path, lease_s
        self.poll_s = min(1.0, lease_s / 5)
        self.owner = f"{owner_id()}:{time.monotonic_ns()}"
        self.etag: str | None = None
        self.lost = False  # set when a renewal finds the lease taken over (we stalled past lease_s)
        self._renewals = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        self._renewals += 1
        return json.dumps({"owner": self.owner, "lease_s": self.lease_s, "renewal": self._renewals, "written": time.time()}).encode()

    def _put(self, **condition: Any) -> str:
        return self.fs.pipe_file(self.path, self._body(), **condition)["ETag"]

    def acquire(self, on_wait: Callable[[], None] | None = None) -> None:
        """Block until this process holds the lease (`on_wait()` once, if it must wait); then
        renew it in the background."""
        seen, seen_at = None, 0.0
        while True:
            try:
                self.etag = self._put(mode="create")
                break
            except FileExistsError:
                if on_wait is not None:
                    on_wait()
                    on_wait = None
            except Exception as err:
                raise LeaseError(f"the lease {self.path} cannot be written: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
            try:
                etag = self.fs.info(self.path)["ETag"]
            except FileNotFoundError:  # released meanwhile: try to create it again at once
                continue
            if etag != seen:
                seen, seen_at = etag, time.monotonic()
            elif time.monotonic() - seen_at >= self.lease_s:
                try:
                    self.etag = self._put(IfMatch=etag)
                    log.warning("took over the lease %s: its holder stopped renewing it %.0f s ago", self.path, self.lease_s)
                    break
                except OSError:  # another waiter took it over first (or it was released): watch again
                    seen = None
            time.sleep(self.poll_s)
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.path}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as err:  # refused (taken over) or transient: the lease record says which
                if self._holder() != self.owner:
                    self.lost = True
                    log.warning("lost the lease %s (renewal refused: %s): another run may build the same entry", self.path, err)
                    return
                # a transient error: the lease is still ours, renew at the next tick

    def _holder(self) -> str | None:
        try:
            return json.loads(self.fs.cat_file(self.path))["owner"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or self.etag is None:
            return
        bucket, key, _ = self.fs.split_path(self.path)
        with contextlib.suppress(OSError):  # taken over meanwhile, or unreachable: it expires on its own
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)

    @contextlib.contextmanager
    def held(self, on_wait: Callable[[], None] | None = None) -> Iterator[S3Lease]:
        self.acquire(on_wait)
        try:
            yield self
        finally:
            self.release()
