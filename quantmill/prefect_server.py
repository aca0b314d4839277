"""The CLI's temporary Prefect server, which never outlives the CLI.

Without `PREFECT_API_URL` Prefect starts a temporary API server as a child process and stops it
at exit (`atexit`). A CLI killed with SIGKILL runs no `atexit`, so Prefect's child stays behind,
holding a port and its database (issue 17). Here the CLI starts the same server (Prefect's own
app factory, on a free loopback port) through `quantmill.orphan_guard`, which asks the kernel to
send it SIGTERM when the CLI dies, however it dies; the CLI then talks to it as to any server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx

from quantmill.core.errors import QuantmillError

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 90.0  # Prefect's 20 s was missed on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup_timeout() -> float:
    raw = os.environ.get(STARTUP_TIMEOUT_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        raise QuantmillError(f"{STARTUP_TIMEOUT_ENV}: {raw!r} is not a number of seconds") from None


def _server_command(port: int) -> list[str]:
    """What Prefect's `SubprocessASGIServer` runs (its app factory, UI off), behind the guard."""
    return [
        sys.executable, "-m", "quantmill.orphan_guard", str(os.getpid()),
        sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on",
    ]


def _wait_healthy(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise QuantmillError(f"the temporary Prefect server exited with status {process.returncode} before it answered (set PREFECT_API_URL to use a running server)")
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise QuantmillError(f"the temporary Prefect server did not answer within {timeout:g} s (raise {STARTUP_TIMEOUT_ENV}, or set PREFECT_API_URL to use a running server)")


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues while the server is up (after it stops they
    would fail, printing `Error logging to API` after the CLI's own last line)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=10)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Yield the API URL the CLI's flows talk to: the configured one, else a temporary server's
    (started here, stopped on the way out, and killed by the kernel if the CLI is killed)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    timeout = startup_timeout()
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    process = subprocess.Popen(_server_command(port), env=env, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(process, url, timeout)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        _stop(process)
