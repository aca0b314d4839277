"""The deployments, run where the user is: a real Prefect server on 127.0.0.1 and `quantmill serve`
in a subprocess. Flow runs are created through the REST API with the parameters the UI's form
sends; `prefect deploy --all` deploys the root prefect.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from tests.served import REPO, api, artifacts, deployments, env_for, events, form, prefect_server, quantmill_serve, task_runs, wait_flow_run
from tests.tiny import make_tiny_llama

INLINE = "name: my-w4-g32\nmethod: rtn\nweights: {bits: 4, granularity: group, group_size: 32}\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    model = make_tiny_llama(root / "tiny-llama")
    (root / "watched").mkdir()
    watch = root / "watch.yaml"
    watch.write_text(yaml.safe_dump({"sources": [{"dir": str(root / "watched"), "recipes": ["w8a16-rtn"], "register_as": "watched", "settle_seconds": 0}]}))
    with prefect_server(root / "prefect-server") as base:
        env = env_for(base, root / "quantmill", root / "prefect-client")
        with quantmill_serve(env, root / "serve.log", "--cron", "*/30 * * * *", "--watch", str(watch)) as proc:
            yield SimpleNamespace(base=base, env=env, model=model, watch=watch, watched=root / "watched", home=root / "quantmill", log=root / "serve.log", proc=proc)


def create_run(stack, params: dict) -> tuple[int, dict]:
    quantize = deployments(stack.base)["quantize"]
    return api(stack.base, "POST", f"/deployments/{quantize['id']}/create_flow_run", {"parameters": params})


def test_a_form_run_completes_and_registers_a_version(stack, monkeypatch):
    status, run = create_run(stack, form(str(stack.model), recipe_yaml=INLINE, register_as="form"))
    assert status == 201, run
    done = wait_flow_run(stack.base, run["id"])
    assert done["state_type"] == "COMPLETED", (done["state"], stack.log.read_text()[-3000:])

    monkeypatch.setenv("QUANTMILL_HOME", str(stack.home))  # the served runs' MLflow store
    from quantmill.tasks.registry import client

    for recipe in ("w8a16-rtn", "my-w4-g32"):
        version = client().get_model_version_by_alias(f"form-{recipe}", "candidate")
        assert version.tags["quantmill.prefect_flow_run_id"] == run["id"]

    found = artifacts(stack.base, run["id"])
    table = json.loads(found["quantize-results"]["data"])
    assert [r["recipe"] for r in table] == ["float (reference)", "w8a16-rtn", "my-w4-g32"]
    columns = set(table[0])
    assert {"ppl", "ppl_ratio", "kl", "top1_agreement", "size_mb", "bits_per_weight", "quantize_seconds", "uri"} <= columns
    assert all(set(r) == columns for r in table)  # every column for every row
    assert table[1]["uri"] == "models:/form-w8a16-rtn/1" and 0 < table[1]["top1_agreement"] <= 1
    links = found["quantize-mlflow"]["data"]
    assert "models:/form-w8a16-rtn/1" in links and version.run_id in links
    stages = json.loads(found["quantize-stages"]["data"])
    assert {s["stage"] for s in stages} >= {"resolve_model", "collect_stats", "quantize w8a16-rtn", "register my-w4-g32"}
    assert {s["cached"] for s in stages} <= {"cached", "computed"}
    _, all_artifacts = api(stack.base, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]}, "type": {"any_": ["progress"]}}})
    held = [e for e in events(stack.base, "prefect.concurrency-limit.acquired") if e["resource"]["prefect.resource.name"] == "gpu"]
    assert any(r["prefect.resource.id"] == f"prefect.flow-run.{run['id']}" for e in held for r in e["related"]), held  # the run held the gpu slot
    progress = {a["description"]: a["data"] for a in all_artifacts}  # per-block (per-window) progress in the UI
    assert progress.get("collect_stats: decoder blocks done") == 100.0, progress
    assert {"quantize w8a16-rtn: blocks done", "evaluate w8a16-rtn: windows done"} <= set(progress), progress


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"recipes": ["w5-magic"]}, "'w5-magic' is not one of"),
        ({"model": "hf:no-org"}, "'hf:no-org' does not match"),
        ({"model": "models:latest"}, "'models:latest' does not match"),
        ({"device": "tpu"}, "'tpu' is not one of"),
        ({"calibration.samples": 0}, "samples"),
        ({"calibration.dataset": "wiki:foo"}, "'wiki:foo' does not match"),
    ],
)
def test_a_bad_value_is_refused_when_the_run_is_created(stack, change, needle):
    status, body = create_run(stack, form(str(stack.model), **change))
    assert status == 409, body
    assert needle in body["detail"], body["detail"]


# Two of them here (each is a served run); tests/test_flow.py checks every case of the shared check.
PRE_TASK = [
    ({"calibration.seq_len": 4096}, "calibration seq_len 4096 exceeds the model's max_position_embeddings 1024"),
    ({"recipe_yaml": "name: bad\nmethod: rtn\nweights: {bits: 12}\n"}, "recipe recipe_yaml: weights.bits"),
]


def test_what_the_schema_cannot_say_fails_before_any_task(stack):
    cases = PRE_TASK
    created = []
    for change, needle in cases:  # all at once: the runner starts them side by side
        status, run = create_run(stack, form(str(stack.model), **change))
        assert status == 201, run
        created.append((run["id"], needle))
    for run_id, needle in created:
        done = wait_flow_run(stack.base, run_id)
        assert done["state_type"] == "FAILED"
        assert needle in done["state"]["message"], done["state"]["message"]
        assert task_runs(stack.base, run_id) == []


def test_a_scheduled_scan_starts_a_served_quantize_run_for_a_new_checkpoint(stack, monkeypatch):
    """The loop end to end through `quantmill serve`: requantize (as its schedule would start it)
    finds a new checkpoint in the watched folder, and the quantize run it starts completes and
    registers the version the next scan looks for."""
    step = make_tiny_llama(stack.watched / "step-1", seed=3)
    requantize = deployments(stack.base)["requantize"]
    status, scan = api(stack.base, "POST", f"/deployments/{requantize['id']}/create_flow_run", {})
    assert status == 201, scan
    assert wait_flow_run(stack.base, scan["id"])["state_type"] == "COMPLETED"
    _, started = api(stack.base, "POST", "/flow_runs/filter", {"flow_runs": {"tags": {"all_": ["requantize"]}}})
    assert [(r["parameters"]["model"], r["parameters"]["recipes"]) for r in started] == [(str(step), ["w8a16-rtn"])]
    done = wait_flow_run(stack.base, started[0]["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    monkeypatch.setenv("QUANTMILL_HOME", str(stack.home))
    from quantmill.tasks.registry import client

    version = client().get_model_version_by_alias("watched-w8a16-rtn", "candidate")
    assert version.tags["quantmill.prefect_flow_run_id"] == started[0]["id"]
    from quantmill.flows.requantize import registered  # what the next scan asks (tests/test_requantize.py scans again)
    from quantmill.methods.recipe_files import load_recipe

    assert registered("watched-w8a16-rtn", version.tags["quantmill.key.resolve_model"], load_recipe("w8a16-rtn").hash)


def test_serve_sets_the_schedule_and_the_gpu_limit(stack):
    requantize = deployments(stack.base)["requantize"]
    assert [s["schedule"]["cron"] for s in requantize["schedules"]] == ["*/30 * * * *"]
    assert requantize["parameters"] == {"watch": str(stack.watch)}
    assert not requantize["paused"]
    status, limit = api(stack.base, "GET", "/v2/concurrency_limits/gpu")
    assert status == 200 and limit["limit"] == 1
    quantize = deployments(stack.base)["quantize"]
    assert quantize["enforce_parameter_schema"] and quantize["entrypoint"] == "quantmill.flows.quantize.quantize_flow"


def test_serve_refuses_a_bad_watch_file_in_one_line(tmp_path):
    bad = tmp_path / "watch.yaml"
    bad.write_text("sources: [{dir: /x, recipes: [w5-magic], register_as: m}]\n")
    done = subprocess.run([sys.executable, "-m", "quantmill.cli", "serve", "--watch", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: watch file {bad}: sources.0.recipes: Value error, unknown recipe 'w5-magic' (built-in: `quantmill recipes`)"]


def test_prefect_deploy_all_from_the_root_prefect_yaml(tmp_path):
    with prefect_server(tmp_path / "prefect-server") as base:
        env = env_for(base, tmp_path / "quantmill", tmp_path / "prefect-client")
        prefect = lambda *args: subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        pool = prefect("work-pool", "create", "quantmill", "--type", "process")
        assert pool.returncode == 0, pool.stdout + pool.stderr
        done = prefect("deploy", "--all")
        assert done.returncode == 0, done.stdout + done.stderr
        found = deployments(base)
        assert set(found) == {"quantize", "requantize", "sweep"}
        assert [s["schedule"]["cron"] for s in found["requantize"]["schedules"]] == ["0 * * * *"]
        assert found["quantize"]["enforce_parameter_schema"] and found["quantize"]["work_pool_name"] == "quantmill"
        # no Docker-only path: flows run from this checkout
        assert found["quantize"]["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        schema = found["quantize"]["parameter_openapi_schema"]["properties"]
        assert "w4a16-gptq-g64" in schema["recipes"]["items"]["enum"] and schema["device"]["enum"] == ["auto", "cpu", "cuda"]
        sweep = found["sweep"]["parameter_openapi_schema"]["properties"]  # the quantize form's choices, plus the cluster's
        assert sweep["recipes"]["items"]["enum"] == schema["recipes"]["items"]["enum"] and sweep["n_workers"]["default"] == 2
        assert {"models", "calibration", "evaluation", "register_prefix", "dask_address"} <= set(sweep)


def test_prefect_yaml_states_what_serve_deploys():
    """prefect.yaml cannot import quantmill/serve.py's settings, so it repeats them: they must agree."""
    from quantmill.serve import DEFAULT_CRON, DESCRIPTIONS, REQUANTIZE_CONCURRENCY, TAGS

    found = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    for name, description in DESCRIPTIONS.items():
        assert found[name]["description"] == description and found[name]["tags"] == TAGS and found[name]["enforce_parameter_schema"] is True
    assert [s["cron"] for s in found["requantize"]["schedules"]] == [DEFAULT_CRON]
    assert found["requantize"]["concurrency_limit"] == REQUANTIZE_CONCURRENCY
    assert "parameters" not in found["quantize"]  # the form's defaults are the flow's (quantmill/tasks/specs.py)
