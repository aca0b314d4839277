"""The CLI's temporary Prefect server (issue 17 item 7): it serves the run, stops with the CLI,
and dies with it when the CLI is killed with SIGKILL; its start limit is configurable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.tiny import make_tiny_llama

SMALL = ["--calib-samples", "8", "--seq-len", "64", "--eval-windows", "2"]


def _temporary_env(tmp_path: Path) -> dict[str, str]:
    """No PREFECT_API_URL: the CLI must start (and stop) a server of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(QUANTMILL_HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"))
    return env


def _server_children(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_the_cli_runs_on_its_own_temporary_server_and_stops_it(tmp_path):
    model = make_tiny_llama(tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", "quantize", "--model", str(model), "--recipe", "w8a16-rtn", *SMALL],
                            cwd=REPO, env=_temporary_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    servers: list[psutil.Process] = []
    while proc.poll() is None and not servers:
        servers = _server_children(proc.pid)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "w8a16-rtn" in out
    assert servers, "the CLI started no temporary server"
    gone, alive = psutil.wait_procs(servers, timeout=15)
    assert not alive, "the temporary server outlived a CLI that exited normally"


def test_a_killed_cli_takes_its_temporary_server_with_it(tmp_path):
    """SIGKILL runs no cleanup in the CLI: the kernel's parent-death signal stops the server."""
    model = make_tiny_llama(tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "quantmill.cli", "quantize", "--model", str(model), "--recipe", "w8a16-rtn", *SMALL],
                            cwd=REPO, env=_temporary_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers: list[psutil.Process] = []
    deadline = time.monotonic() + 300
    while not servers and proc.poll() is None and time.monotonic() < deadline:
        servers = _server_children(proc.pid)
        time.sleep(0.2)
    assert servers, "no temporary server seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(servers, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, "the temporary server outlived its killed CLI"


def test_the_guard_exits_when_its_parent_is_already_gone():
    """The race the guard closes: a parent that died before the signal was armed."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    result = subprocess.run([sys.executable, "-m", "quantmill.orphan_guard", str(dead.pid), sys.executable, "-c", "print('ran')"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "ran" not in result.stdout


def test_a_bad_start_limit_is_a_one_line_error(tmp_path):
    model = make_tiny_llama(tmp_path / "m")
    env = {**_temporary_env(tmp_path), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "soon"}
    result = subprocess.run([sys.executable, "-m", "quantmill.cli", "quantize", "--model", str(model), "--recipe", "w8a16-rtn", *SMALL],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 'soon' is not a number of seconds"
    assert not (tmp_path / "home" / "quantize").exists()
