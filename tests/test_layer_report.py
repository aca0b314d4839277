"""The per-layer report reaches people: MLflow metrics with step = block, a PNG, a Prefect table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantmill.flows.quantize import quantize_flow
from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec
from quantmill.tasks.report import block_of, block_summary, layer_metrics, markdown_table, suffix_of

SMALL = dict(calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EvaluationSpec(windows=2, seq_len=64))
BLOCKS = 2  # tests.tiny.make_tiny_llama's default depth


def test_rows_are_grouped_by_block_whatever_the_method():
    gptq_row = {"module": "model.layers.3.self_attn.q_proj", "block": 3, "gptq_loss": 0.5, "rel_output_error": 0.1, "fallback_rtn": False, "damp": 0.01}
    rtn_row = {"module": "model.decoder.layers.7.fc1", "shape": [8, 8], "rel_weight_error": 0.2, "granularity": "group"}
    assert (block_of(gptq_row), suffix_of(gptq_row)) == (3, "self_attn.q_proj")
    assert (block_of(rtn_row), suffix_of(rtn_row)) == (7, "fc1")  # no `block` field: from the name
    names = {(n, s) for n, _, s in layer_metrics([gptq_row, rtn_row])}
    assert ("layer.self_attn.q_proj.gptq_loss", 3) in names and ("layer.self_attn.q_proj.fallback_rtn", 3) in names
    assert ("layer.fc1.rel_weight_error", 7) in names and ("block.rel_weight_error", 7) in names
    assert not any(".shape" in n or ".granularity" in n or n.endswith(".block") for n, _ in names)
    summary = block_summary([gptq_row, rtn_row], {3: 1.5})
    assert [r["block"] for r in summary] == [3, 7] and summary[0]["seconds"] == 1.5
    assert "| block |" in markdown_table([gptq_row])


def _history(client, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, name))


def _prefect_artifacts(flow_run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found if a.key}


@pytest.mark.parametrize("recipe, fields", [
    ("w4a16-gptq", ("gptq_loss", "rel_output_error", "damp", "fallback_rtn")),
    ("w4a16-rtn", ("rel_weight_error", "rel_output_error")),
])
def test_register_logs_the_layer_report_per_block(prefect_api, tiny_model: Path, home: Path, recipe, fields):
    from quantmill.tasks.registry import client

    out = quantize_flow(model=str(tiny_model), recipes=[recipe], register_as="layers", **SMALL)
    row = out["rows"][0]
    c = client()
    version = c.get_model_version_by_alias(f"layers-{recipe}", "candidate")
    run_id = version.run_id
    report = json.loads((Path(row["checkpoint"]).parent / "report.json").read_text())
    suffixes = {suffix_of(r) for r in report}
    assert {"self_attn.q_proj", "mlp.down_proj"} <= suffixes

    # One step per block, for every module's fields and for the block means.
    for field in fields:
        assert _history(c, run_id, f"block.{field}") == list(range(BLOCKS)), field
        for suffix in suffixes:
            assert _history(c, run_id, f"layer.{suffix}.{field}") == list(range(BLOCKS)), (suffix, field)
    # The logged values are the report's.
    q0 = next(r for r in report if block_of(r) == 0 and suffix_of(r) == "self_attn.q_proj")
    logged = {m.step: m.value for m in c.get_metric_history(run_id, "layer.self_attn.q_proj.rel_output_error")}
    assert logged[0] == pytest.approx(q0["rel_output_error"])
    mean1 = sum(r["rel_output_error"] for r in report if block_of(r) == 1) / len(suffixes)
    assert {m.step: m.value for m in c.get_metric_history(run_id, "block.rel_output_error")}[1] == pytest.approx(mean1)

    # The plot is an artifact of the run, and a real PNG.
    assert "layer_report/rel_output_error.png" in [a.path for a in c.list_artifacts(run_id, "layer_report")]
    png = Path(c.download_artifacts(run_id, "layer_report/rel_output_error.png", str(home / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Prefect shows the per-block table of this flow run's quantize stage.
    artifacts = _prefect_artifacts(out["flow_run_id"])
    table = artifacts[f"quantize-report-{recipe}"]
    assert "| block |" in table and all(f"| {b} |" in table for b in range(BLOCKS))
    if recipe.startswith("w4a16-gptq"):
        assert "seconds" in table  # the sequential engine timed each block
        assert len(c.get_metric_history(run_id, "block.seconds")) == BLOCKS


def test_block_times_survive_a_kill(tiny_model: Path, tmp_path: Path):
    """The engine times every block into its partial metadata, so a resumed stage still knows
    how long the blocks of the killed run took (quantmill/tasks/quantize.py puts them in the manifest)."""
    import torch

    from quantmill.model.sequential import finished_blocks, run_sequential
    from quantmill.io.sources import load_model

    model = load_model(tiny_model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    visit = lambda i, block, inputs, forward: ({}, {"block": i}, None)  # noqa: E731
    assert finished_blocks(tmp_path / "partial") == {}
    run_sequential(model, ids, visit, device=torch.device("cpu"), batch_size=2, partial_dir=tmp_path / "partial", stop_after=0)
    done = finished_blocks(tmp_path / "partial")
    assert list(done) == [0] and done[0]["block"] == 0 and done[0]["seconds"] > 0
