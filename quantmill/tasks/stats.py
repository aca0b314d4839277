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

from prefect import task
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from quantmill.eval.outlier_report import has_outlier_report, write_outlier_report
from quantmill.io.sources import load_model
from quantmill.model.sequential import pick_device
from quantmill.model.stats import collect_stats as collect
from quantmill.model.stats import load_stats, save_stats
from quantmill.tasks.calibrate import read_token_table
from quantmill.tasks.common import Progress, entry_result, log, store, store_cache_key
from quantmill.tasks.resolve import checkpoint_dir
from quantmill.tasks.store import stage_key

STAGE = "collect_stats"
BATCH_SIZE = 8


def stats_key(model_key: str, calibration_key: str) -> str:
    return stage_key(STAGE, {"batch_size": BATCH_SIZE}, {"model": model_key, "calibration": calibration_key})


_store_key = store_cache_key(lambda p: (STAGE, stats_key(p["model"]["key"], p["calibration"]["key"])))


def _cache_key(context, parameters: dict[str, Any]) -> str:
    """The store key; an entry still without its outlier report makes Prefect run the task (which adds it)."""
    cache_key = _store_key(context, parameters)
    found = store().get(STAGE, stats_key(parameters["model"]["key"], parameters["calibration"]["key"]))
    if found is not None and not has_outlier_report(found.path):
        (Path(PREFECT_LOCAL_STORAGE_PATH.value()) / cache_key).unlink(missing_ok=True)
    return cache_key


def _title(model: dict[str, Any]) -> str:
    return str((model.get("manifest") or {}).get("source") or model["key"][:12])


def ensure_outlier_report(entry_path: Path, title: str) -> dict[str, Any] | None:
    """Add the outlier report to a stats entry that lacks it; None when it was already there."""
    if has_outlier_report(entry_path):
        return None
    return write_outlier_report(load_stats(entry_path), entry_path, title=title)


@task(name="collect_stats", cache_key_fn=_cache_key, persist_result=True)
def collect_stats(model: dict[str, Any], calibration: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """Walks the blocks on the device; per-block partial results make a killed run resume."""
    key = stats_key(model["key"], calibration["key"])
    s = store()
    found = s.get(STAGE, key)
    if found is not None:
        log(f"reused collect_stats key {key[:12]}")
        added = ensure_outlier_report(found.path, _title(model))
        if added is not None:
            log(f"added the outlier report to collect_stats key {key[:12]} ({added['outlier_channels']} outlier channels)")
        return entry_result(found, reused=True)
    with s.build(STAGE, key) as tmp:
        net = load_model(checkpoint_dir(model))
        ids = read_token_table(Path(calibration["path"]) / "samples.parquet")
        progress = Progress("collect_stats: decoder blocks done")
        stats = collect(net, ids, pick_device(device), batch_size=BATCH_SIZE, partial_dir=tmp / "partial", on_block_done=lambda i, n, _: progress.update(i + 1, n))
        summary = save_stats(stats, tmp)
        outliers = write_outlier_report(stats, tmp, title=_title(model))
        entry = s.commit(tmp, STAGE, key, {"summary": summary, "outliers": outliers, "model_key": model["key"], "calibration_key": calibration["key"]})
    log(f"collected stats of {summary['modules']} modules -> key {key[:12]} (max |x| {summary['max_absmax']:.1f} in {summary['max_absmax_module']})")
    return entry_result(entry, reused=False)
