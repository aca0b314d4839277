"""`python -m quantmill.orphan_guard PARENT_PID COMMAND...`: run COMMAND so that it gets SIGTERM
when PARENT_PID dies, even by SIGKILL.

Linux keeps a "parent death signal" across `exec`, so the guard sets it and then becomes COMMAND
(no extra process stays). If the parent is already gone when the guard starts, it exits at once.
Elsewhere than Linux the command simply runs (the CLI still stops it on a normal exit).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        sys.exit(1)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m quantmill.orphan_guard PARENT_PID COMMAND [ARGS...]")
    die_with_parent(int(argv[0]))
    os.execv(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
