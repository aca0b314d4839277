"""Real processes for the deployment, UI and requantize tests: a Prefect server on 127.0.0.1 and
`quantmill serve`, each in its own process group (always stopped), and small API helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group, SIGKILL after `grace` seconds; then SIGKILL to any descendant
    that left the group (a child started in a session of its own) and is still alive."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def prefect_server(home: Path, **extra: str) -> Iterator[str]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (and `extra`
    settings, e.g. PREFECT_API_DATABASE_CONNECTION_URL); yields the API URL."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    # the UI asks its own port (the default is 4200)
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": "",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api", **extra}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log, 180)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc)


def env_for(api: str, quantmill_home: Path | str, prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(prefect_home), "QUANTMILL_HOME": str(quantmill_home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "2", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@contextmanager
def quantmill_serve(env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen]:
    """`quantmill serve ARGS` in its own process group; waits until both deployments exist."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", "serve", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"quantmill serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if "requantize" in log.read_text() and len(deployments(env["PREFECT_API_URL"])) >= 2:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"quantmill serve did not register its deployments:\n{log.read_text()[-3000:]}")
        yield proc
    finally:
        stop(proc)


def form(source: str, **changes) -> dict:
    """Every field of the quantize form, filled in as a person would (what the Run button sends)."""
    params = {
        "model": source,
        "recipes": ["w8a16-rtn"],
        "recipe_yaml": "",
        "calibration": {"dataset": "stdlib:calib", "samples": 8, "seq_len": 64, "seed": 0},
        "evaluation": {"dataset": "stdlib:eval", "windows": 2, "seq_len": 64},
        "register_as": "",
        "gate": {},
        "allow_pickle": False,
        "device": "cpu",
    }
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            params[outer] = {**params[outer], inner: value}
        else:
            params[key] = value
    return params


def api(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call to the Prefect REST API, as the UI makes it; (status, JSON body). A busy server's
    503 (its SQLite database locked on a loaded machine) is retried, as Prefect's own client does."""
    import httpx

    for attempt in range(6):
        r = httpx.request(method, base + path, json=body, timeout=30)
        if r.status_code not in (429, 503):
            break
        time.sleep(2**attempt)
    return r.status_code, (r.json() if r.content else None)


def deployments(base: str) -> dict[str, dict[str, Any]]:
    status, found = api(base, "POST", "/deployments/filter", {})
    return {d["name"]: d for d in found} if status == 200 else {}


def wait_flow_run(base: str, flow_run_id: str, timeout: float = 900) -> dict[str, Any]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, run = api(base, "GET", f"/flow_runs/{flow_run_id}")
        if run and run.get("state_type") in TERMINAL:
            return run
        time.sleep(2)
    raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout} s: {run.get('state_name') if run else None}")


def task_runs(base: str, flow_run_id: str) -> list[dict[str, Any]]:
    _, found = api(base, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return found


def artifacts(base: str, flow_run_id: str) -> dict[str, dict[str, Any]]:
    _, found = api(base, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a.get("key")}


def events(base: str, name: str) -> list[dict[str, Any]]:
    _, found = api(base, "POST", "/events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})
    return found["events"] if found else []


def _drain_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=15)
    EventsWorker.drain_all(timeout=15)


@contextmanager
def this_process_uses(api_url: str) -> Iterator[None]:
    """Point this process's Prefect client, events and run logs at API_URL. The event and log
    workers are process-wide, made on first use with the API URL of the moment (the session's
    test harness, when an earlier test used it), so they are drained on the way in and out; the
    global settings context is what their threads read (the harness sets it the same way)."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _drain_workers()
    with temporary_settings({PREFECT_API_URL: api_url}):
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            try:
                yield
            finally:
                _drain_workers()
