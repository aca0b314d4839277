"""collect_stats: per-Linear-input activation statistics over the calibration samples, and the
outlier report drawn from them (outliers.parquet, outliers_heatmap.png, outlier_channels.png in
the same store entry).

An entry made before the outlier report existed gets the report added in place (derived files
only, each renamed into place, the stats themselves untouched) the next time the stage is asked
for, so a cached demo store shows the plots without re-collecting its statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantmill.eval.outlier_report import has_outlier_report, write_outlier_report
from quantmill.io.sources import load_model
from quantmill.model.sequential import pick_device
from quantmill.model.stats import collect_stats as collect
from quantmill.model.stats import load_stats, save_stats
from quantmill.tasks.calibrate import read_token_table
from quantmill.tasks.common import Progress
from quantmill.tasks.resolve import checkpoint_dir
from quantmill.tasks.stage import Built, Refresh, Work, stage
from quantmill.tasks.store import Entry, stage_key

STAGE = "collect_stats"
BATCH_SIZE = 8


def stats_key(model_key: str, calibration_key: str) -> str:
    return stage_key(STAGE, {"batch_size": BATCH_SIZE}, {"model": model_key, "calibration": calibration_key})


def _title(model: dict[str, Any]) -> str:
    return str((model.get("manifest") or {}).get("source") or model["key"][:12])


def _outlier_report(title: str) -> Refresh:
    """An entry made before the outlier report existed gets it added in place when reused."""

    def add(entry: Entry) -> str:
        added = write_outlier_report(load_stats(entry.path), entry.path, title=title)
        return f"added the outlier report to collect_stats key {entry.key[:12]} ({added['outlier_channels']} outlier channels)"

    return Refresh(stale=lambda entry: not has_outlier_report(entry.path), apply=add)


@stage(STAGE)
def collect_stats(model: dict[str, Any], calibration: dict[str, Any], device: str | None = None) -> Work:
    """Walks the blocks on the device; per-block partial results make a killed run resume."""
    key = stats_key(model["key"], calibration["key"])

    def build(tmp: Path) -> Built:
        net = load_model(checkpoint_dir(model))
        ids = read_token_table(Path(calibration["path"]) / "samples.parquet")
        progress = Progress("collect_stats: decoder blocks done")
        stats = collect(net, ids, pick_device(device), batch_size=BATCH_SIZE, partial_dir=tmp / "partial", on_block_done=lambda i, n, _: progress.update(i + 1, n))
        summary = save_stats(stats, tmp)
        outliers = write_outlier_report(stats, tmp, title=_title(model))
        manifest = {"summary": summary, "outliers": outliers, "model_key": model["key"], "calibration_key": calibration["key"]}
        return Built(manifest, f"collected stats of {summary['modules']} modules -> key {key[:12]} (max |x| {summary['max_absmax']:.1f} in {summary['max_absmax_module']})")

    return Work(key, build, refresh=_outlier_report(_title(model)))
