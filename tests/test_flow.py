"""The quantize flow end to end against a real Prefect API, on a tiny seeded Llama."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quantmill.flows.quantize import quantize_flow
from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec

SMALL = dict(calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EvaluationSpec(windows=4, seq_len=64))
SHARED = ("resolve_model", "capture_calibration", "collect_stats", "evaluate float")


def _flow_logs(flow_run_id: str, wanted: Callable[[list[str]], bool], timeout_s: float = 60.0) -> list[str]:
    """The flow run's log lines once `wanted` holds for them (or the timeout passes)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    # Run logs reach the API in the background, in batches and not in order: a task's
    # "Finished in state" line can arrive before the flow's own line about it, so wait for
    # the lines themselves.
    messages: list[str] = []
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            messages = [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]
            if wanted(messages):
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
    names = ("resolve_model", "capture_calibration", "collect_stats")

    def says_cached(lines: list[str], name: str) -> bool:
        return any(name in line and "cached" in line and by_stage[name]["key"] in line for line in lines)

    logs = _flow_logs(third["flow_run_id"], lambda lines: all(says_cached(lines, n) for n in names))
    for name in names:
        assert says_cached(logs, name), name


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


# The one pre-task check (quantmill/flows/params.py) the flow and the CLI share, and the results table.

@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "hf:no-org"}, "model source 'hf:no-org' is not one of"),
        ({"recipes": ["w5-magic"]}, "unknown recipe 'w5-magic'"),
        ({"recipe_yaml": "name: x\nmethod: rtn\nweights: {bits: 4, granularity: group}\n"}, "recipe recipe_yaml: weights: Value error, granularity 'group' needs group_size"),
        ({"recipe_yaml": "[unclosed"}, "recipe_yaml: not valid YAML"),
        ({"recipes": ["w8a16-rtn"], "recipe_yaml": "name: w8a16-rtn\nmethod: rtn\nweights: {bits: 8}\n"}, "recipe names must be unique"),
        ({"calibration": {"samples": 0}}, "calibration.samples: Input should be greater than 0"),
        ({"evaluation": {"dataset": "wiki:x"}}, "unknown dataset spec 'wiki:x'"),
        ({"evaluation": {"seq_len": 2048}}, "evaluation seq_len 2048 exceeds the model's max_position_embeddings 1024"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"register_as": "no spaces"}, "register name 'no spaces' must match"),
        ({"register_as": "o'brien"}, "register name \"o'brien\" must match"),  # never pasted into an MLflow filter
        ({"register_as": "../x"}, "register name '../x' must match"),  # refused before the work, not by MLflow after it
    ],
)
def test_check_request_names_the_bad_value(tiny_model: Path, change, message):
    from quantmill.flows.params import check_request
    from quantmill.core.errors import QuantmillError

    request = {"model": str(tiny_model), "recipes": ["w8a16-rtn"], **change}
    with pytest.raises(QuantmillError) as err:
        check_request(**request)
    assert message in str(err.value), str(err.value)


def test_check_request_reads_names_files_and_inline_yaml(tiny_model: Path, tmp_path: Path):
    from quantmill.flows.params import check_request, split_recipes
    from quantmill.methods.recipe_files import load_recipe

    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\nmethod: rtn\nweights: {bits: 4, granularity: group, group_size: 32}\n")
    inline = "- {name: a, method: rtn, weights: {bits: 8}}\n- {name: b, method: rtn, weights: {bits: 4}}\n"
    plan = check_request(str(tiny_model), ["w8a16-rtn", str(mine)], inline, {"samples": 8, "seq_len": 64}, None, "cpu")
    assert [r.name for r in plan.recipes] == ["w8a16-rtn", "mine", "a", "b"]
    assert (plan.calibration.samples, plan.evaluation.windows, plan.device) == (8, 32, "cpu")
    names, text = split_recipes(["w8a16-rtn", str(mine)])  # what the CLI hands the flow: the same recipe, the same hash
    assert names == ["w8a16-rtn"]
    assert check_request(str(tiny_model), [], text).recipes[0].hash == load_recipe(str(mine)).hash


def test_a_bad_value_fails_the_flow_before_any_task(prefect_api, tiny_model: Path, home: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = quantize_flow(model=str(tiny_model), recipes=["w8a16-rtn"], device="cuda" if not _cuda() else "tpu", return_state=True, **SMALL)
    assert state.is_failed() and "device" in state.message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert runs == []
    assert not home.exists() or not any((home / "resolve_model").glob("*"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_results_table_has_every_column_for_every_row():
    from quantmill.flows.quantize import results_table

    rows = [
        {"recipe": "a", "ppl": 10.123456, "uri": "models:/m-a/1", "quantized_key": "k" * 64},
        {"recipe": "b", "ppl": 11.0, "gate": "failed", "gate_reasons": "ppl ratio 1.2 > 1.05", "uri": None},
    ]
    table = results_table({"ppl": 9.0, "size_mb": 1.5, "seconds": 0.1}, rows)
    assert [r["recipe"] for r in table] == ["float (reference)", "a", "b"]
    assert list(table[1]) == ["recipe", "ppl", "ppl_ratio", "size_mb", "seconds", "uri", "gate", "gate_reasons", "quantized_key"]
    assert all(list(r) == list(table[0]) for r in table)
    assert table[1]["ppl"] == 10.1235 and table[2]["gate"] == "failed" and table[1]["gate"] == "\u2014"


def test_inline_recipe_yaml_from_the_form_has_the_recipe_files_limits():
    """A few lines of YAML aliases expand to gigabytes: the form's text is refused like a file's."""
    from quantmill.flows.params import inline_recipes
    from quantmill.core.errors import RecipeError

    bomb = 'a: &a ["x", "x"]\nb: &b [*a, *a]\nc: &c [*b, *b]\nname: w\nmethod: rtn\nweights: {bits: 8}\n'
    with pytest.raises(RecipeError, match=r"^recipe_yaml: .*alias"):
        inline_recipes(bomb)
    with pytest.raises(RecipeError, match=r"^recipe_yaml: \d+ bytes, more than the 200000 allowed"):
        inline_recipes("#" * 200_001)
    assert [r.name for r in inline_recipes("name: w8\nmethod: rtn\nweights: {bits: 8}\n")] == ["w8"]
