"""The quantize flow end to end against a real Prefect API, on a tiny seeded Llama."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.quantize import quantize_flow
from tasks.calibrate import CalibrationSpec, EvaluationSpec

SMALL = dict(calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EvaluationSpec(windows=4, seq_len=64))
SHARED = ("resolve_model", "capture_calibration", "collect_stats", "evaluate float")


def _flow_logs(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    import time

    # Run logs reach the API in the background: poll until the flow's last line has arrived.
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        for _ in range(60):
            messages = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            if any("Finished in state" in m for m in messages):
                break
            time.sleep(0.5)
    return messages


def test_second_run_is_cached_and_a_new_recipe_reuses_the_shared_stages(prefect_api, tiny_model: Path, home: Path):
    first = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], **SMALL)
    assert [s["cached"] for s in first["stages"]] == [False] * len(first["stages"])

    second = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], **SMALL)
    assert all(s["cached"] for s in second["stages"])
    assert {s["prefect_state"] for s in second["stages"]} == {"Cached"}  # Prefect's UI shows "Cached"
    assert second["rows"] == first["rows"]

    third = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn", "w4a16-rtn-g64"], **SMALL)
    by_stage = {s["stage"]: s for s in third["stages"]}
    assert all(by_stage[name]["cached"] for name in SHARED)
    assert not by_stage["quantize w4a16-rtn-g64"]["cached"]
    logs = _flow_logs(third["flow_run_id"])
    for name in ("resolve_model", "capture_calibration", "collect_stats"):
        assert any(name in line and "cached" in line and by_stage[name]["key"] in line for line in logs), name


def test_an_entry_deleted_by_hand_is_recomputed(prefect_api, tiny_model: Path, home: Path):
    first = quantize_flow(model=str(tiny_model), recipes=["w4a16-rtn"], **SMALL)
    key = first["rows"][0]["quantized_key"]
    shutil.rmtree(home / "quantize" / key)
    again = quantize_flow(model=str(tiny_model), recipes=["w4a16-rtn"], **SMALL)
    by_stage = {s["stage"]: s for s in again["stages"]}
    assert not by_stage["quantize w4a16-rtn"]["cached"]
    assert (home / "quantize" / key / "manifest.json").is_file()
    assert again["rows"][0]["ppl"] == pytest.approx(first["rows"][0]["ppl"])


def test_results_carry_lineage_and_metrics(prefect_api, tiny_model: Path, home: Path):
    import json

    out = quantize_flow(model=str(tiny_model), recipes=["w4a16-rtn-g64-asym"], **SMALL)
    row = out["rows"][0]
    lineage = json.loads((Path(row["checkpoint"]) / "quantmill.json").read_text())
    assert lineage["stage_keys"]["quantize"] == row["quantized_key"]
    assert lineage["source"] == str(tiny_model)
    assert lineage["prefect_flow_run_id"] == out["flow_run_id"]
    assert set(lineage["source_file_hashes"]) >= {"config.json", "model.safetensors"}
    assert 0.0 <= row["kl"] and 0.0 < row["top1_agreement"] <= 1.0
    assert row["bits_per_weight"] > 4
