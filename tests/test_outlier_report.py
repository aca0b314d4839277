"""The outlier report: per layer and module from the stored stats, plotted, kept in the stats entry
by the flow, logged to MLflow with the run; and LLM.int8() end to end through the flow."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from quantmill.eval.outlier_report import (
    CHANNELS_FILE,
    HEATMAP_FILE,
    REPORT_FILES,
    TABLE_FILE,
    has_outlier_report,
    outlier_rows,
    write_outlier_report,
)
from quantmill.model.stats import load_stats, save_stats
from quantmill.solvers.observers import ActivationStats

PNG = b"\x89PNG\r\n\x1a\n"


def _stats() -> dict[str, ActivationStats]:
    """Two layers; q/k/v and gate/up share inputs; channels 2 and 9 of layer 1's down_proj input are outliers."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(2):
        hidden = ActivationStats.from_batches([torch.randn(4, 32, 16, generator=g)], nbins=256)
        inner = torch.randn(4, 32, 24, generator=g)
        if layer == 1:
            inner[0, 3, 2] = 40.0
            inner[:, :5, 9] = -7.0
        down = ActivationStats.from_batches([inner], nbins=256)
        attn = ActivationStats.from_batches([torch.randn(4, 32, 16, generator=g)], nbins=256)
        p = f"model.layers.{layer}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            out[f"{p}.{name}"] = hidden
        out[f"{p}.self_attn.o_proj"] = attn
        out[f"{p}.mlp.gate_proj"] = out[f"{p}.mlp.up_proj"] = ActivationStats.from_batches([torch.randn(4, 32, 16, generator=g)], nbins=256)
        out[f"{p}.mlp.down_proj"] = down
    return out


def test_rows_name_the_largest_value_its_channel_and_the_outlier_channels(tmp_path):
    save_stats(_stats(), tmp_path)  # the store keeps a copy per module: sharing is found again by content
    rows = {r["name"]: r for r in outlier_rows(load_stats(tmp_path))}
    down = rows["model.layers.1.mlp.down_proj"]
    assert (down["layer"], down["module"]) == (1, "mlp.down_proj")
    assert down["absmax"] == pytest.approx(40.0) and down["absmax_channel"] == 2
    assert down["outlier_channels"] == 2 and down["outlier_channel_ids"] == [9, 2]  # most frequent first
    assert down["outlier_values"] == 21
    assert rows["model.layers.0.mlp.down_proj"]["outlier_channels"] == 0
    assert rows["model.layers.1.self_attn.k_proj"]["shares_input_of"] == "model.layers.1.self_attn.q_proj"
    assert rows["model.layers.1.mlp.up_proj"]["shares_input_of"] == "model.layers.1.mlp.gate_proj"
    assert rows["model.layers.1.self_attn.q_proj"]["shares_input_of"] is None
    assert list(rows)[:4] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj"]


def test_report_files_are_pngs_and_a_parquet_table(tmp_path):
    summary = write_outlier_report(_stats(), tmp_path, title="synthetic")
    assert has_outlier_report(tmp_path)
    for name in (HEATMAP_FILE, CHANNELS_FILE):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    table = pq.read_table(tmp_path / TABLE_FILE).to_pylist()
    assert len(table) == 14 and table[0]["module"] == "self_attn.q_proj"
    assert summary["kinds"] == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert summary["inputs"] == 8 and summary["inputs_with_outliers"] == 1 and summary["outlier_channels"] == 2
    assert summary["max_absmax_module"] == "model.layers.1.mlp.down_proj" and summary["max_absmax_channel"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_flow_keeps_the_report_in_the_stats_entry_logs_it_to_mlflow_and_runs_llm_int8(prefect_api, tiny_model: Path, home: Path):
    from quantmill.flows.quantize import quantize_flow
    from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec
    from quantmill.tasks.registry import client

    small = dict(calibration=CalibrationSpec(samples=8, seq_len=64), evaluation=EvaluationSpec(windows=2, seq_len=64))
    summary = quantize_flow(model=str(tiny_model), recipes=["w8-llmint8-t6"], register_as="tiny", **small)
    stats_key = next(s["key"] for s in summary["stages"] if s["stage"] == "collect_stats")
    entry = home / "collect_stats" / stats_key
    assert has_outlier_report(entry)
    assert json.loads((entry / "manifest.json").read_text())["outliers"]["inputs"] > 0

    row = summary["rows"][0]
    evaluated = [json.loads(p.read_text()) for p in (home / "evaluate").glob("*/metrics.json")]
    metrics = next(m for m in evaluated if "mean_outlier_fraction" in m)
    assert 0.0 <= metrics["mean_outlier_fraction"] <= metrics["max_outlier_fraction"] <= 1.0
    assert len(metrics["outlier_fraction_by_module"]) == 14
    assert row["ppl_ratio"] < 1.05

    c = client()
    run_id = c.get_model_version("tiny-w8-llmint8-t6", row["uri"].rsplit("/", 1)[1]).run_id
    logged = {Path(a.path).name for a in c.list_artifacts(run_id, "outliers")}
    assert logged == set(REPORT_FILES)
    assert "mean_outlier_fraction" in c.get_run(run_id).data.metrics

    # An entry made before the report existed gets it on the next run (Prefect runs the task again).
    for name in REPORT_FILES:
        (entry / name).unlink()
    again = quantize_flow(model=str(tiny_model), recipes=["w8-llmint8-t6"], **small)
    assert next(s for s in again["stages"] if s["stage"] == "collect_stats")["cached"]
    assert has_outlier_report(entry)
