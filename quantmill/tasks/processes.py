"""Is the process that left something behind still running? (partials, scratch folders, MLflow runs)

A pid alone names a process only while it lives; an owner id adds the host and the process's start
time, so a recycled pid is not taken for the owner, and another host's owner is never judged.
"""

from __future__ import annotations

import os
import socket

import psutil


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped by its parent) does not."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def owner_id(pid: int | None = None) -> str:
    """`host:pid:start` of this process (or of `pid`)."""
    process = psutil.Process(pid or os.getpid())
    return f"{socket.gethostname()}:{process.pid}:{int(process.create_time())}"


def owner_alive(owner: str) -> bool | None:
    """True or False for an owner on this host; None when it is another host's (or unreadable)."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    host, pid, start = parts[0], int(parts[1]), int(parts[2])
    if host != socket.gethostname():
        return None
    try:
        return int(psutil.Process(pid).create_time()) == start
    except psutil.NoSuchProcess:
        return False
