"""requantize against a real Prefect server on 127.0.0.1: the quantize deployment exists (its runs
wait, no worker), the requantize flow scans a watched folder, a local hub cache and an MLflow
alias, and starts one quantize run per new (checkpoint revision, recipe)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.served import api, deployments, events, prefect_server, this_process_uses
from tests.tiny import make_tiny_llama

RECIPES = ["w8a16-rtn", "w4a16-rtn"]
COMMIT_1 = "1111111111111111111111111111111111111111"
COMMIT_2 = "2222222222222222222222222222222222222222"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("requantize") / "prefect-server") as base:
        yield base


@pytest.fixture
def world(server, tmp_path, monkeypatch):
    """This process talks to the test server; a private store, MLflow and hub cache; the quantize
    deployment registered as `quantmill serve` registers it (nobody runs it here)."""
    monkeypatch.setenv("QUANTMILL_HOME", str(tmp_path / "home"))
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with this_process_uses(server):
        from quantmill.serve import build_deployments

        build_deployments()[0].apply()
        yield tmp_path


def write_watch(path: Path, *sources: dict) -> str:
    path.write_text(yaml.safe_dump({"sources": [{"recipes": RECIPES, "settle_seconds": 0, **s} for s in sources]}))
    return str(path)


def quantize_runs(base: str, tag: str = "requantize") -> list[dict]:
    _, runs = api(base, "POST", "/flow_runs/filter", {"flow_runs": {"tags": {"all_": [tag]}}, "deployments": {"name": {"any_": ["quantize"]}}})
    return runs


def scan(watch: str) -> dict:
    from quantmill.flows.requantize import requantize_flow

    return requantize_flow(watch=watch)


def started(out: dict) -> list[tuple[str, str]]:
    return sorted((s["source"], s["recipe"]) for s in out["started"])


def cancel(base: str, runs: list[dict]) -> None:
    for run in runs:
        status, _ = api(base, "POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True})
        assert status in (200, 201)


def test_a_new_checkpoint_gets_one_run_per_recipe_then_none_then_new_ones_when_it_changes(server, world):
    from quantmill.flows.quantize import quantize_flow
    from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec

    watched = world / "checkpoints"
    step = make_tiny_llama(watched / "step-100")
    watch = write_watch(world / "watch.yaml", {"dir": str(watched), "register_as": "acme"})

    first = scan(watch)
    assert started(first) == sorted((str(step), r) for r in RECIPES)
    runs = quantize_runs(server)
    assert sorted((r["parameters"]["model"], r["parameters"]["recipes"][0]) for r in runs) == started(first)
    assert all(r["parameters"]["register_as"] == "acme" and r["state_type"] == "SCHEDULED" for r in runs)

    second = scan(watch)  # the runs are still waiting: nothing new starts
    assert second["started"] == [] and {s["reason"] for s in second["skipped"]} == {"run in flight"}

    # The runs give up; the same pairs get registered by a run from the CLI instead: still nothing new.
    cancel(server, runs)
    quantize_flow(model=str(step), recipes=RECIPES, register_as="acme", calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EvaluationSpec(windows=2, seq_len=64))
    third = scan(watch)
    assert third["started"] == [] and [s["reason"] for s in third["skipped"]] == ["registered", "registered"]

    # Training writes new weights into the same folder: a new revision, new runs.
    make_tiny_llama(step, seed=1)
    fourth = scan(watch)
    assert started(fourth) == sorted((str(step), r) for r in RECIPES)
    assert {s["revision"] for s in fourth["started"]}.isdisjoint({s["revision"] for s in first["started"]})
    assert len(quantize_runs(server)) == 4

    found = _events(server, lambda e: e["resource"]["quantmill.source"] == str(step), 2)
    assert [e["payload"]["revision"] for e in found] == [fourth["started"][0]["revision"], first["started"][0]["revision"]]  # newest first
    assert sorted(found[0]["payload"]["flow_run_ids"]) == sorted(s["flow_run_id"] for s in fourth["started"])


def test_a_new_commit_in_the_hub_cache_gets_new_runs(server, world, tiny_model):
    repo = world / "hub" / "models--acme--tiny-llama"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT_1)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT_1)
    watch = write_watch(world / "watch.yaml", {"hf": "acme/tiny-llama@main", "register_as": "hubbed"})

    first = scan(watch)
    assert started(first) == sorted((f"hf:acme/tiny-llama@{COMMIT_1}", r) for r in RECIPES)
    assert scan(watch)["started"] == []

    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT_2)  # a new commit on main
    (repo / "refs" / "main").write_text(COMMIT_2)
    again = scan(watch)
    assert started(again) == sorted((f"hf:acme/tiny-llama@{COMMIT_2}", r) for r in RECIPES)
    found = _events(server, lambda e: e["resource"]["quantmill.source"].startswith("hf:acme/tiny-llama@"), 2)
    assert {e["payload"]["revision"] for e in found} == {COMMIT_1, COMMIT_2}


def test_a_new_version_behind_an_mlflow_alias_gets_new_runs(server, world, tiny_model):
    from quantmill.tasks.registry import client

    c = client()
    c.create_registered_model("base-llama")
    v1 = c.create_model_version("base-llama", source=str(tiny_model))
    c.set_registered_model_alias("base-llama", "production", v1.version)
    watch = write_watch(world / "watch.yaml", {"mlflow": "models:/base-llama@production", "register_as": "based", "recipes": ["w8a16-rtn"]})

    assert started(scan(watch)) == [("models:/base-llama/1", "w8a16-rtn")]
    assert scan(watch)["started"] == []
    v2 = c.create_model_version("base-llama", source=str(tiny_model))
    c.set_registered_model_alias("base-llama", "production", v2.version)
    assert started(scan(watch)) == [("models:/base-llama/2", "w8a16-rtn")]


def test_a_bad_watch_file_fails_the_scan_with_the_reason(server, world):
    from prefect.client.orchestration import get_client

    from quantmill.flows.requantize import requantize_flow

    bad = world / "watch.yaml"
    bad.write_text("sources: [{hf: acme/x, recipes: [w8a16-rtn]}]\n")
    state = requantize_flow(watch=str(bad), return_state=True)
    assert state.is_failed() and "sources.0.register_as: Field required" in state.message
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).state.is_failed()


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"device": "tpu"}, "sources.0.parameters: Validation failed for field 'device'. Failure reason: 'tpu' is not one of"),
        ({"calibration": {"samples": 0}}, "sources.0.parameters: Validation failed for field 'calibration.samples'"),
        ({"seq_len": 64}, "sources.0.parameters: unknown quantize parameter 'seq_len'"),
        ({"model": "demo"}, "parameters may not set model"),
    ],
)
def test_a_watch_file_with_bad_quantize_parameters_is_refused(tmp_path, parameters, message):
    from quantmill.flows.requantize import load_watch
    from quantmill.core.errors import QuantmillError

    watch = write_watch(tmp_path / "watch.yaml", {"dir": str(tmp_path), "register_as": "m", "parameters": parameters})
    with pytest.raises(QuantmillError, match=re.escape(message)):
        load_watch(watch)


def _events(base: str, which, count: int) -> list[dict]:
    """quantmill.checkpoint.detected events read back from the API (they arrive in the background)."""
    found: list[dict] = []
    for _ in range(60):
        found = [e for e in events(base, "quantmill.checkpoint.detected") if which(e)]
        if len(found) >= count:
            break
        time.sleep(0.5)
    assert len(found) == count, found
    return found


def test_requantize_deployment_runs_hourly_by_default(server, world):
    from prefect.client.orchestration import get_client

    from quantmill.serve import build_deployments

    build_deployments(watch=str(world / "watch.yaml"))[1].apply()
    requantize = deployments(server)["requantize"]
    assert [s["schedule"]["cron"] for s in requantize["schedules"]] == ["0 * * * *"]
    assert requantize["global_concurrency_limit"]["limit"] == 1  # one scan at a time
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("requantize/requantize").parameters == {"watch": str(world / "watch.yaml")}
