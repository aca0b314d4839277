"""The team stack's servers as real processes on 127.0.0.1, no Docker: Postgres from Debian's
packages, an S3-compatible server (moto in server mode), an MLflow server on Postgres with its
artifacts in that S3, and a Prefect process worker. Each is a context manager that stops what it
started, whatever happened inside (tests/served.py has the Prefect server and the API helpers)."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.served import REPO, free_port, stop, wait_http

# The names infra/compose.yaml and infra/env.example use, so the test runs the stack they describe.
DB_USER = "quantmill"
PREFECT_DB = "prefect"
MLFLOW_DB = "mlflow"
REGION = "us-east-1"


def postgres_bin(name: str) -> str:
    """A Postgres program: on PATH, else the newest of Debian's /usr/lib/postgresql/N/bin (which
    the `postgresql` package does not put on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if not candidates:
        raise RuntimeError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin: `make test` installs Debian's postgresql")
    return max(candidates, key=lambda p: int(re.search(r"/postgresql/(\d+)/", p).group(1)))


def _as_postgres_user() -> list[str]:
    """Postgres refuses to run as root: as root (CI), run its programs as the `postgres` user the
    Debian package creates; otherwise as whoever we are."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str
    version: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{database}"


def _connect(port: int, password: str, database: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname=database, connect_timeout=3)


@contextmanager
def postgres(databases: tuple[str, ...] = (PREFECT_DB, MLFLOW_DB)) -> Iterator[Postgres]:
    """A fresh cluster in a temporary folder (its data, log and unix socket), listening on a free
    loopback port with a password, holding `databases`; fast-shutdown and removed on the way out."""
    # mkdtemp under /tmp, not pytest's tmp_path: that is mode 0700 under root, closed to `postgres`
    root = Path(tempfile.mkdtemp(prefix="quantmill-pg-"))
    as_user = _as_postgres_user()
    if as_user:
        shutil.chown(root, "postgres", "postgres")
    password = "stack-test"
    (root / "pw").write_text(password + "\n")
    if as_user:
        shutil.chown(root / "pw", "postgres", "postgres")
    proc = None
    try:
        init = subprocess.run(
            [*as_user, postgres_bin("initdb"), "-D", str(root / "data"), "-U", DB_USER, f"--pwfile={root / 'pw'}",
             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
            capture_output=True, text=True, timeout=120,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        port = free_port()
        log = root / "postgres.log"
        with open(log, "w") as out:
            # fsync off: a throwaway cluster on a shared disk; setpriv execs, so proc.pid is the postmaster
            proc = subprocess.Popen(
                [*as_user, postgres_bin("postgres"), "-D", str(root / "data"), "-h", "127.0.0.1", "-p", str(port), "-k", str(root), "-c", "fsync=off"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.time() + 60
        while True:
            try:
                conn = _connect(port, password)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"postgres did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in databases:
                cur.execute(f'CREATE DATABASE "{db}"')
            cur.execute("SHOW server_version")
            version = cur.fetchone()[0]
        conn.close()
        yield Postgres(port=port, password=password, version=version)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: SIGTERM would wait for clients to leave
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str

    def env(self) -> dict[str, str]:
        """What every S3 client of the stack reads: boto3 and s3fs (AWS_*), MLflow (MLFLOW_S3_ENDPOINT_URL)."""
        return {"AWS_ACCESS_KEY_ID": "stack-test-key", "AWS_SECRET_ACCESS_KEY": "stack-test-secret", "AWS_DEFAULT_REGION": REGION,
                "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        env = self.env()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (all pages)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextmanager
def moto_s3(folder: Path, bucket: str) -> Iterator[S3]:
    """`moto_server` (an in-memory S3) on a free loopback port, with `bucket` created."""
    import botocore.exceptions

    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        s3 = S3(endpoint=f"http://127.0.0.1:{port}", bucket=bucket)
        deadline = time.time() + 60
        while True:
            try:
                s3.client().create_bucket(Bucket=bucket)
                break
            except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield s3
    finally:
        stop(proc)


@dataclass(frozen=True)
class Server:
    """A server process started but perhaps not yet answering: `ready()` waits for its health URL."""

    url: str
    proc: subprocess.Popen
    log: Path
    health: str

    def ready(self, timeout: float = 180) -> str:
        wait_http(self.url + self.health, self.proc, self.log, timeout)
        return self.url


@contextmanager
def mlflow_process(folder: Path, backend_uri: str, artifacts_destination: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`mlflow server` on a free loopback port, artifacts served (proxied) from `artifacts_destination`,
    returning as soon as it is started (a caller starts other servers while it migrates its
    database). Job execution off: it would start ~8 more processes (1 GB) for nothing here."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "mlflow.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, "--serve-artifacts", "--artifacts-destination", artifacts_destination]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Server(f"http://127.0.0.1:{port}", proc, log, "/health")
    finally:
        stop(proc)


@contextmanager
def mlflow_server(folder: Path, backend_uri: str, artifacts_destination: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow_process`, once it answers /health; yields its URL."""
    with mlflow_process(folder, backend_uri, artifacts_destination, env) as server:
        yield server.ready()


def prefect_cli(env: dict[str, str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`prefect --no-prompt ARGS` from the repository root (where prefect.yaml is)."""
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def process_worker(env: dict[str, str], pool: str, log: Path) -> Iterator[subprocess.Popen]:
    """`prefect worker start --type process` polling `pool` every 2 s; the flow runs it starts are
    its children, stopped with it."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"],
                                cwd=REPO, env={**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "started" not in log.read_text().lower():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"prefect worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield proc
    finally:
        stop(proc)
