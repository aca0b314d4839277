"""The team stack of infra/compose.yaml, started natively on 127.0.0.1 (no Docker engine): Postgres
from Debian's packages holding Prefect's and MLflow's databases, a Prefect server on it, an MLflow
server on it with artifacts in an S3 bucket (moto in server mode), QUANTMILL_HOME on that bucket,
a process work pool and a worker. The `quantize` deployment of prefect.yaml runs through the
worker on a tiny model; the version's files and the stage entries must then be in the bucket.

QUANTMILL_STACK_LOCAL_STORE=1 keeps QUANTMILL_HOME a local folder (for a tree without the S3 store):
everything else runs the same, and the stage entries are checked there, reported as a skip."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from tests.served import REPO, api, deployments, env_for, form, prefect_server, wait_flow_run
from tests.services import DB_USER, MLFLOW_DB, PREFECT_DB, REGION, mlflow_process, moto_s3, postgres, postgres_bin, prefect_cli, process_worker
from tests.tiny import make_tiny_llama

pytestmark = pytest.mark.stack

LOCAL_STORE = os.environ.get("QUANTMILL_STACK_LOCAL_STORE") == "1"
BUCKET = "mlflow"  # infra/env.example's MLFLOW_BUCKET
ARTIFACTS = "artifacts"  # compose.yaml: --artifacts-destination s3://$MLFLOW_BUCKET/artifacts
STORE = "quantmill"  # QUANTMILL_HOME=s3://$MLFLOW_BUCKET/quantmill
POOL = "quantmill"  # prefect.yaml's work pool, infra/env.example's PREFECT_WORK_POOL
REGISTER_AS = "stack"
STAGES = ("resolve_model", "capture_calibration", "collect_stats", "quantize")


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The whole stack, one quantize run through it; every process it started is stopped on the
    way out (a teardown error names any that is still alive)."""
    root = tmp_path_factory.mktemp("team-stack")
    model = make_tiny_llama(root / "tiny-llama")
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. the session's Prefect harness
    stack = ExitStack()
    try:
        pg = stack.enter_context(postgres())
        s3 = stack.enter_context(moto_s3(root / "s3", BUCKET))
        # MLflow migrates its database while Prefect starts and the deployment is made
        mlflow_starting = stack.enter_context(mlflow_process(root / "mlflow", pg.url(MLFLOW_DB, "postgresql+psycopg2"), f"s3://{BUCKET}/{ARTIFACTS}", s3.env()))
        base = stack.enter_context(prefect_server(root / "prefect-server", PREFECT_API_DATABASE_CONNECTION_URL=pg.url(PREFECT_DB, "postgresql+asyncpg")))
        home = str(root / "quantmill") if LOCAL_STORE else f"s3://{BUCKET}/{STORE}"
        env = env_for(base, home, root / "prefect-client", QUANTMILL_CACHE=str(root / "cache"), **s3.env())
        env["MLFLOW_TRACKING_URI"] = mlflow_starting.url
        # docs/DEPLOY.md's once-per-server steps: the pool and the gpu limit through the API (the
        # CLI's `work-pool create` is run by tests/test_deployment.py), the deployment by the CLI
        assert api(base, "POST", "/work_pools/", {"name": POOL, "type": "process"})[0] == 201
        assert api(base, "POST", "/v2/concurrency_limits/", {"name": "gpu", "limit": 1})[0] == 201
        done = prefect_cli(env, "deploy", "--name", "quantize")
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
        worker_log = root / "worker.log"
        stack.enter_context(process_worker(env, POOL, worker_log))
        mlflow = mlflow_starting.ready()
        quantize = deployments(base)["quantize"]
        status, run = api(base, "POST", f"/deployments/{quantize['id']}/create_flow_run", {"parameters": form(str(model), register_as=REGISTER_AS)})
        assert status == 201, run
        done = wait_flow_run(base, run["id"], timeout=600)
        yield SimpleNamespace(pg=pg, s3=s3, base=base, mlflow=mlflow, home=home, run=done, worker_log=worker_log)
    finally:
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        stack.close()
        left = _alive(started)
        assert not left, f"still running after the stack stopped: {left}"


def _db(stack, database: str, query: str, *args) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=stack.pg.port, user=DB_USER, password=stack.pg.password, dbname=database) as conn:
        with conn.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall()


def _completed(stack) -> None:
    assert stack.run["state_type"] == "COMPLETED", (stack.run["state"], stack.worker_log.read_text()[-4000:])


def _version(stack):
    """The one version the run registered, and a client of the stack's MLflow server."""
    from mlflow import MlflowClient

    _completed(stack)
    client = MlflowClient(tracking_uri=stack.mlflow, registry_uri=stack.mlflow)
    versions = client.search_model_versions(f"name = '{REGISTER_AS}-w8a16-rtn'")
    assert len(versions) == 1, versions
    return client, versions[0]


def test_the_quantize_deployment_runs_through_the_worker_on_postgres(stack):
    _completed(stack)
    assert stack.run["work_pool_name"] == POOL
    # Prefect and MLflow keep their state in Postgres: read it there, not through their APIs
    assert _db(stack, PREFECT_DB, "SELECT state_type FROM flow_run WHERE id = %s", stack.run["id"]) == [("COMPLETED",)]
    assert _db(stack, MLFLOW_DB, "SELECT name, version FROM model_versions") == [(f"{REGISTER_AS}-w8a16-rtn", 1)]


def test_the_versions_files_are_objects_in_the_bucket(stack):
    from quantmill.tasks.registry import MODEL_ARTIFACT, checkpoint_hashes

    client, version = _version(stack)
    assert version.tags["quantmill.prefect_flow_run_id"] == stack.run["id"]
    run = client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: the worker holds no bucket path
    prefix = f"{ARTIFACTS}/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/').strip('/')}/{MODEL_ARTIFACT}/"
    objects = {k.removeprefix(prefix): k for k in stack.s3.keys(prefix)}
    hashes = checkpoint_hashes(version.tags)
    assert {"config.json", "quantmill.json", "MLmodel"} <= set(hashes) and set(hashes) <= set(objects), (sorted(hashes), sorted(objects))
    s3 = stack.s3.client()
    for name, digest in hashes.items():  # the bytes in the bucket are the ones the version names
        body = s3.get_object(Bucket=stack.s3.bucket, Key=objects[name])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, name


def _store_manifests(stack) -> dict[str, dict]:
    """Every entry's manifest in the run's QUANTMILL_HOME, by `<stage>/<key>`."""
    if LOCAL_STORE:
        found = Path(stack.home).glob("*/*/manifest.json")
        return {str(p.parent.relative_to(stack.home)): json.loads(p.read_text()) for p in found}
    s3 = stack.s3.client()
    manifests = {}
    for key in stack.s3.keys(f"{STORE}/"):
        if key.endswith("/manifest.json"):
            body = s3.get_object(Bucket=stack.s3.bucket, Key=key)["Body"].read()
            manifests[key.removeprefix(f"{STORE}/").removesuffix("/manifest.json")] = json.loads(body)
    return manifests


def test_the_stage_entries_are_in_the_bucket(stack):
    _, version = _version(stack)
    manifests = _store_manifests(stack)
    for stage in STAGES:  # the entries the registered version was built from
        key = version.tags[f"quantmill.key.{stage}"]
        assert manifests.get(f"{stage}/{key}", {}).get("key") == key, (stage, sorted(manifests))
    assert any(name.startswith("evaluate/") for name in manifests), sorted(manifests)
    if LOCAL_STORE:
        pytest.skip("QUANTMILL_STACK_LOCAL_STORE=1: the stage entries were checked in a local QUANTMILL_HOME, not in the bucket")
    assert not [k for k in stack.s3.keys(f"{STORE}/") if "/.tmp-" in k]  # nothing half-written left


def test_compose_describes_the_stack_this_test_runs():
    """infra/compose.yaml and infra/env.example name the Postgres major version, drivers, databases,
    bucket layout and pool that the stack above ran with (compose itself cannot run here)."""
    services = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())["services"]
    lines = (REPO / "infra" / "env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    major = subprocess.run([postgres_bin("postgres"), "--version"], capture_output=True, text=True).stdout.split()[2].split(".")[0]
    assert services["postgres"]["image"] == f"${{POSTGRES_IMAGE:-postgres:{major}}}" and example["POSTGRES_IMAGE"] == f"postgres:{major}"
    assert (example["POSTGRES_USER"], example["PREFECT_DB"], example["MLFLOW_DB"]) == (DB_USER, PREFECT_DB, MLFLOW_DB)
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    mlflow = services["mlflow"]
    assert "--backend-store-uri postgresql+psycopg2://" in mlflow["command"]  # a bare postgresql:// is psycopg 3 to SQLAlchemy 2.1
    assert f"--serve-artifacts --artifacts-destination s3://${{MLFLOW_BUCKET:-{BUCKET}}}/{ARTIFACTS}" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert (example["MLFLOW_BUCKET"], example["PREFECT_WORK_POOL"], example["AWS_DEFAULT_REGION"]) == (BUCKET, POOL, REGION)
    worker = services["worker"]["environment"]
    assert worker["QUANTMILL_HOME"] == f"s3://${{MLFLOW_BUCKET:-{BUCKET}}}/{STORE}" and worker["AWS_ENDPOINT_URL"] == worker["MLFLOW_S3_ENDPOINT_URL"]
    assert "QUANTMILL_CACHE" in worker and services["worker-cuda"]["environment"] == worker


def test_a_smoke_text_with_a_nul_registers_on_postgres(stack, monkeypatch):
    """Postgres refuses NUL in text (MLflow answers 500; SQLite takes it), and a tiny or broken
    model's smoke text can hold one: found by this stack's run on 2026-12-06. What quantmill sends
    to MLflow goes through db_safe."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from quantmill.tasks.registry import db_safe, gate_tags

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a 500 is final here: no minutes of retries
    client = MlflowClient(tracking_uri=stack.mlflow)
    run = client.create_run(client.create_experiment("nul-text"))
    text = "smoke \x00 text"
    with pytest.raises(MlflowException):
        client.set_tag(run.info.run_id, "raw", text)  # what registration used to send
    tags = {k: db_safe(v) for k, v in gate_tags({"status": "passed", "limits": {}, "smoke": {"text": text}}).items()}
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    assert client.get_run(run.info.run_id).data.tags["quantmill.gate.smoke_text"] == "smoke \\0 text"
