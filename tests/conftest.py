"""Shared fixtures: a fresh Prefect home and a real Prefect API (test harness), tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# Before prefect is imported anywhere: a fresh home per session, so persisted results of an
# earlier session never make a first run look "Cached"; no telemetry (offline machines).
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="quantmill-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["QUANTMILL_HOME"] = str(_SESSION_HOME / "quantmill")
os.environ.pop("MLFLOW_TRACKING_URI", None)
warnings.filterwarnings("ignore", message=".*noload.*")

from quantmill.core.threads import prefer_passive_waits  # noqa: E402

prefer_passive_waits()  # before torch: the suite shares its cores with the servers it starts

import pytest  # noqa: E402

from tests import services  # noqa: E402
from tests.served import free_port as _free_port  # noqa: E402,F401  (tests/test_fetch.py imports it from here)
from tests.tiny import make_tiny_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_api():
    """A real temporary Prefect server for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private QUANTMILL_HOME (store + MLflow) for one test."""
    root = tmp_path / "home"
    monkeypatch.setenv("QUANTMILL_HOME", str(root))
    return root


def run_cli(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`quantmill ARGS` in a subprocess (the console script's module), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "quantmill.cli", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts); yields its URL."""
    with services.mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}", str(tmp_path / "server-artifacts")) as url:
        yield url
