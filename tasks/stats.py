"""collect_stats: per-Linear-input activation statistics over the calibration samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from quant.sequential import pick_device
from quant.sources import load_model
from quant.stats import collect_stats as collect
from quant.stats import save_stats
from tasks.calibrate import read_token_table
from tasks.common import Progress, entry_result, log, store, store_cache_key
from tasks.resolve import checkpoint_dir
from tasks.store import stage_key

STAGE = "collect_stats"
BATCH_SIZE = 8


def stats_key(model_key: str, calibration_key: str) -> str:
    return stage_key(STAGE, {"batch_size": BATCH_SIZE}, {"model": model_key, "calibration": calibration_key})


@task(
    name="collect_stats",
    cache_key_fn=store_cache_key(lambda p: (STAGE, stats_key(p["model"]["key"], p["calibration"]["key"]))),
    persist_result=True,
)
def collect_stats(model: dict[str, Any], calibration: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """Walks the blocks on the device; per-block partial results make a killed run resume."""
    key = stats_key(model["key"], calibration["key"])
    s = store()
    found = s.get(STAGE, key)
    if found is not None:
        log(f"reused collect_stats key {key[:12]}")
        return entry_result(found, reused=True)
    with s.build(STAGE, key) as tmp:
        net = load_model(checkpoint_dir(model))
        ids = read_token_table(Path(calibration["path"]) / "samples.parquet")
        progress = Progress("collect_stats: decoder blocks done")
        stats = collect(net, ids, pick_device(device), batch_size=BATCH_SIZE, partial_dir=tmp / "partial", on_block_done=lambda i, n, _: progress.update(i + 1, n))
        summary = save_stats(stats, tmp)
        entry = s.commit(tmp, STAGE, key, {"summary": summary, "model_key": model["key"], "calibration_key": calibration["key"]})
    log(f"collected stats of {summary['modules']} modules -> key {key[:12]} (max |x| {summary['max_absmax']:.1f} in {summary['max_absmax_module']})")
    return entry_result(entry, reused=False)
