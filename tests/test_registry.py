"""Registration in a real MLflow backend: a SQLite store, and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantmill.flows.quantize import quantize_flow
from quantmill.io.checkpoint import load_quantized
from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec

SMALL = dict(calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EvaluationSpec(windows=2, seq_len=64))


def _client():
    from quantmill.tasks.registry import client

    return client()


def _check_registered(out: dict, name: str) -> None:
    row = out["rows"][0]
    model_name = f"{name}-{row['recipe']}"
    assert row["uri"] == f"models:/{model_name}/1"
    c = _client()
    version = c.get_model_version_by_alias(model_name, "candidate")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["quantmill.quantized_key"] == row["quantized_key"]
    assert tags["quantmill.key.resolve_model"] == out["model_key"]
    assert tags["quantmill.prefect_flow_run_id"] == out["flow_run_id"]
    assert tags["quantmill.source.sha256.model.safetensors"]  # of the float source, named so
    assert tags["quantmill.checkpoint.sha256.model.safetensors"] != tags["quantmill.source.sha256.model.safetensors"]
    assert tags["quantmill.gate"] == "passed"
    run = c.get_run(version.run_id)
    assert run.data.metrics["ppl"] == pytest.approx(row["ppl"])
    assert "recipe.weights.bits" in run.data.params


def _fetch_and_compare(model_name: str, row: dict, tmp_path: Path) -> None:
    """What a serving team does: download by alias, load with transformers; same logits as quantmill."""
    import mlflow
    from transformers import AutoModelForCausalLM

    from quantmill.tasks.registry import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}@candidate", dst_path=str(tmp_path / "fetched"))
    served = AutoModelForCausalLM.from_pretrained(local).eval()
    ours = load_quantized(row["checkpoint"])
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (served(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_register_on_sqlite_never_overwrites(prefect_api, tiny_model, home, tmp_path):
    out = quantize_flow(model=str(tiny_model), recipes=["w4a16-rtn-g64"], register_as="tiny", **SMALL)
    _check_registered(out, "tiny")
    again = quantize_flow(model=str(tiny_model), recipes=["w4a16-rtn-g64"], register_as="tiny", **SMALL)
    assert again["rows"][0]["uri"] == out["rows"][0]["uri"]
    versions = _client().search_model_versions("name='tiny-w4a16-rtn-g64'")
    assert len(versions) == 1
    assert (home / "mlflow" / "mlflow.db").is_file()
    _fetch_and_compare("tiny-w4a16-rtn-g64", out["rows"][0], tmp_path)


def test_models_uri_source_resolves_the_registered_version(prefect_api, tiny_model, home):
    from quantmill.tasks.resolve import resolve_model, source_identity

    quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], register_as="tiny", **SMALL)
    identity = source_identity("models:/tiny-w8a16-rtn@candidate")
    assert identity == {"kind": "mlflow", "uri": "models:/tiny-w8a16-rtn/1"}
    entry = resolve_model.fn("models:/tiny-w8a16-rtn@candidate")
    assert Path(entry["path"], "checkpoint", "quantmill.json").is_file()
    assert entry["manifest"]["resolved_revision"] == "models:/tiny-w8a16-rtn/1"


def test_unknown_models_uri_is_a_one_line_error(home):
    from quantmill.core.errors import SourceError
    from quantmill.tasks.resolve import source_identity

    with pytest.raises(SourceError, match="cannot resolve models:/nope@candidate"):
        source_identity("models:/nope@candidate")


def test_register_on_a_real_mlflow_server(prefect_api, tiny_model, home, tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], register_as="served", **SMALL)
    _check_registered(out, "served")
    assert not (home / "mlflow").exists()  # everything went to the server
    _fetch_and_compare("served-w8a16-rtn", out["rows"][0], tmp_path)


_DIES_WHILE_REGISTERING = """
import os, sys, time
from pathlib import Path
from quantmill.tasks.registry import OWNER_TAG, SCRATCH, experiment_id, mlflow_module, store, tracking_uri
from quantmill.tasks.processes import owner_id
mlflow = mlflow_module()
mlflow.set_tracking_uri(tracking_uri())
scratch = store().root / SCRATCH / f"{os.getpid()}-tiny-w8a16-rtn-abc"
scratch.mkdir(parents=True)
(scratch / "model.safetensors").write_bytes(b"half a copy")
run = mlflow.start_run(experiment_id=experiment_id(), run_name="tiny-w8a16-rtn", tags={OWNER_TAG: owner_id()})
print(run.info.run_id, flush=True)
time.sleep(600)
"""


def test_a_registration_killed_mid_way_is_closed_by_the_next_one(prefect_api, tiny_model, home):
    """Issue 17 item 7: a process SIGKILLed while registering leaves its MLflow run RUNNING and its
    scratch copy; the next registration marks that run KILLED and removes the copy. Runs of live
    processes and of other hosts are left alone."""
    import os
    import signal
    import subprocess
    import sys

    from quantmill.tasks.processes import owner_id
    from quantmill.tasks.registry import OWNER_TAG, SCRATCH, experiment_id

    dying = subprocess.Popen([sys.executable, "-c", _DIES_WHILE_REGISTERING], cwd=Path(__file__).parent.parent,
                             # mlflow.set_tracking_uri exports an earlier test's store URI: drop it
                             env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "QUANTMILL_HOME": str(home)},
                             stdout=subprocess.PIPE, text=True)
    killed_run = dying.stdout.readline().strip()
    assert killed_run, "the registering process did not start its run"
    dying.send_signal(signal.SIGKILL)
    dying.wait()
    c = _client()
    live_run = c.create_run(experiment_id(), tags={OWNER_TAG: owner_id()}).info.run_id  # this process: alive
    elsewhere = c.create_run(experiment_id(), tags={OWNER_TAG: "another-host:1:1"}).info.run_id
    assert c.get_run(killed_run).info.status == "RUNNING"

    out = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], register_as="tiny", **SMALL)

    assert out["rows"][0]["uri"] == "models:/tiny-w8a16-rtn/1"
    closed = c.get_run(killed_run)
    assert closed.info.status == "KILLED"
    assert "died before the run ended" in closed.data.tags["quantmill.abandoned"]
    assert c.get_run(live_run).info.status == "RUNNING"
    assert c.get_run(elsewhere).info.status == "RUNNING"
    assert list((home / SCRATCH).iterdir()) == []
    registered = c.get_run(c.get_model_version("tiny-w8a16-rtn", "1").run_id)
    assert registered.info.status == "FINISHED" and registered.data.tags[OWNER_TAG].split(":")[1] == str(os.getpid())
