"""The sweep flow: several recipes of a tiny model through a real 2-worker Dask LocalCluster,
a real Prefect API and a real MLflow (SQLite) registry; the shared stages are computed once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from quantmill.core.errors import QuantmillError
from quantmill.eval.plots import pareto_front
from quantmill.flows.sweep import check_sweep, sweep_flow
from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec
from quantmill.tasks.store import Store

SMALL = dict(calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EvaluationSpec(windows=2, seq_len=64))
RECIPES = ["w8a16-rtn", "w4a16-rtn", "w4a16-rtn-g64-asym"]


def test_three_recipes_on_two_dask_workers_share_one_calibration_and_stats(prefect_api, tiny_model: Path, home: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from quantmill.tasks.registry import client

    out = sweep_flow(models=[str(tiny_model)], recipes=RECIPES, register_prefix="sweep", n_workers=2, **SMALL)

    store = Store(home)
    counts = {stage: len(store.entries(stage)) for stage in ("resolve_model", "capture_calibration", "collect_stats", "quantize", "evaluate")}
    assert counts == {"resolve_model": 1, "capture_calibration": 1, "collect_stats": 1, "quantize": 3, "evaluate": 4}  # evaluate: float + 3
    assert [r["recipe"] for r in out["rows"]] == RECIPES
    workers = {r["worker"] for r in out["rows"]}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers  # both worker processes took work

    c = client()
    for row in out["rows"]:
        version = c.get_model_version_by_alias(f"sweep-tiny-llama-{row['recipe']}", "candidate")
        assert row["uri"] == f"models:/sweep-tiny-llama-{row['recipe']}/{version.version}"
        assert version.tags["quantmill.quantized_key"] == row["quantized_key"]
        assert version.tags["quantmill.prefect_flow_run_id"] == out["flow_run_id"]  # the worker ran inside this flow run

    plot = Path(out["plot"])
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["pareto_front"] == [(r["model"], r["recipe"]) for r in pareto_front(out["rows"])]

    with get_client(sync_client=True) as prefect:
        found = {a.key: a for a in prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[out["flow_run_id"]])))}
    assert {"sweep-results", "sweep-pareto", "sweep-stages", "sweep-mlflow"} <= set(found)
    table = json.loads(found["sweep-results"].data)
    assert [r["recipe"] for r in table] == ["float (reference)", *RECIPES]
    assert {r["model"] for r in table} == {str(tiny_model)} and all(set(r) == set(table[0]) for r in table)
    assert table[1]["uri"] == out["rows"][0]["uri"]
    pareto = found["sweep-pareto"].data
    assert "data:image/png;base64," in pareto and str(plot) in pareto
    assert all(f"| {recipe} |" in pareto for _, recipe in out["pareto_front"])


def test_pareto_front_keeps_what_nothing_beats_on_both_size_and_perplexity():
    rows = [
        {"recipe": "a", "size_mb": 1.0, "ppl": 20.0},
        {"recipe": "b", "size_mb": 2.0, "ppl": 12.0},
        {"recipe": "c", "size_mb": 2.5, "ppl": 15.0},  # larger and worse than b
        {"recipe": "d", "size_mb": 4.0, "ppl": 11.0},
        {"recipe": "e", "size_mb": 1.0, "ppl": 25.0},  # as small as a, worse
        {"recipe": "f", "size_mb": None, "ppl": 1.0},  # no size: not plotted
    ]
    assert [r["recipe"] for r in pareto_front(rows)] == ["a", "b", "d"]



def test_the_sweep_plot_takes_several_float_references_and_marks_the_front(tmp_path: Path):
    from quantmill.eval.plots import size_vs_ppl

    refs = [{"label": "a", "size_mb": 4.0, "ppl": 10.0}, {"label": "b", "size_mb": 8.0, "ppl": 9.0}]
    rows = [{"recipe": "a: w4", "size_mb": 1.0, "ppl": 12.0}, {"recipe": "b: w4", "size_mb": 2.0, "ppl": 11.0}, {"recipe": "b: w8", "size_mb": 2.5, "ppl": 11.5}]
    path = size_vs_ppl(refs, rows, tmp_path / "p.png", front=True)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_two_models_that_would_register_under_one_name_are_refused_before_any_work(tiny_model: Path, tmp_path: Path):
    import shutil

    twin = tmp_path / "elsewhere" / tiny_model.name
    shutil.copytree(tiny_model, twin)
    with pytest.raises(QuantmillError, match=r"would register under the same name sweep-tiny-llama-RECIPE"):
        check_sweep([str(tiny_model), str(twin)], ["w8a16-rtn"], "", None, None, "auto", False, "sweep")
    checked = check_sweep([str(tiny_model), str(twin)], ["w8a16-rtn"], "", None, None, "auto", False, "")
    assert [name for _, name in checked.values()] == ["", ""]  # not registering: no names to clash


def test_a_bad_sweep_value_fails_before_any_task(prefect_api, tiny_model: Path, home: Path):
    missing = str(home.parent / "no-such-model")  # the second model: the first must not have started
    state = sweep_flow(models=[str(tiny_model), missing], recipes=["w8a16-rtn"], return_state=True, **SMALL)
    assert state.is_failed() and f"model path not found: {missing}" in state.message, state.message
    assert not (home / "resolve_model").exists()


def test_a_scheduler_whose_workers_use_another_store_is_refused_before_any_task(prefect_api, tiny_model: Path, home: Path, tmp_path: Path):
    from distributed import LocalCluster

    other = tmp_path / "another-home"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, env={"QUANTMILL_HOME": str(other)}) as cluster:
        state = sweep_flow(models=[str(tiny_model)], recipes=["w8a16-rtn"], dask_address=cluster.scheduler_address, return_state=True, **SMALL)
    assert state.is_failed() and f"uses QUANTMILL_HOME={other}, this flow {home}: workers must share the flow's store and registry" in state.message, state.message
    assert not (home / "resolve_model").exists()
