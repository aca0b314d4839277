"""quantize: model + calibration + stats + recipe -> a quantized checkpoint with lineage and report."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from quantmill import __version__
from quantmill.core.errors import QuantmillError, RecipeError
from quantmill.io.checkpoint import save_quantized
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext, target_linears
from quantmill.methods.recipe import Recipe
from quantmill.methods.registry import REGISTRY
from quantmill.model.sequential import finished_blocks, large_frees_returned_to_os, pick_device, release_host_memory
from quantmill.model.stats import load_stats
from quantmill.tasks.calibrate import read_token_table
from quantmill.tasks.common import Progress, log
from quantmill.tasks.report import markdown_table
from quantmill.tasks.resolve import checkpoint_dir
from quantmill.tasks.stage import Built, Work, stage
from quantmill.tasks.store import stage_key

STAGE = "quantize"


def quantize_key(model_key: str, calibration_key: str, stats_key: str, recipe: Recipe) -> str:
    """The store key of one quantization. A method's code version enters the key once it is bumped
    past 1 (its registry entry's `version`), so entries made before methods had versions keep their keys."""
    params: dict[str, Any] = {"recipe_hash": recipe.hash}
    version = REGISTRY[recipe.method].version
    if version != 1:
        params["method_version"] = version
    return stage_key(STAGE, params, {"model": model_key, "calibration": calibration_key, "stats": stats_key})


def lineage(model: dict[str, Any], calibration: dict[str, Any], stats: dict[str, Any], recipe: Recipe, key: str) -> dict[str, Any]:
    m = model["manifest"]
    return {
        "quantmill_version": __version__,
        "source": m["source"],
        "resolved_revision": m.get("resolved_revision"),
        "source_file_hashes": m["file_hashes"],
        "calibration_text_sha256": calibration["manifest"]["text_sha256"],
        "calibration_spec": calibration["manifest"]["spec"],
        "stage_keys": {"resolve_model": model["key"], "capture_calibration": calibration["key"], "collect_stats": stats["key"], "quantize": key},
        "recipe": recipe.name,
        "recipe_hash": recipe.hash,
        "prefect_flow_run_id": str(flow_run.get_id()) if flow_run.get_id() else None,
    }


def _report_artifact(recipe: Recipe, report: list[dict[str, Any]], block_seconds: dict[int, float]) -> None:
    """The per-block report as a markdown artifact in Prefect's UI (a nicety: never fails the stage)."""
    if not report:
        return
    try:
        create_markdown_artifact(
            key="quantize-report-" + re.sub(r"[^a-z0-9-]+", "-", recipe.name.lower()).strip("-"),
            markdown=markdown_table(report, block_seconds, title=f"### Per-block report: {recipe.name} ({recipe.method})"),
            description=f"per-block quantization report for recipe {recipe.name}",
        )
    except Exception as err:  # no run context (library use) or an API hiccup
        log(f"could not create the per-block report artifact: {err}")


@stage(STAGE)
def quantize(model: dict[str, Any], calibration: dict[str, Any], stats: dict[str, Any], recipe: Recipe, device: str | None = None) -> Work:
    recipe = Recipe.model_validate(recipe)
    key = quantize_key(model["key"], calibration["key"], stats["key"], recipe)

    def build(tmp: Path) -> Built:
        start = time.perf_counter()
        src = checkpoint_dir(model)
        net = load_model(src)
        if not target_linears(net, recipe):  # a degenerate result is refused, not cached
            raise RecipeError(f"recipe {recipe.name}: its ignore patterns {list(recipe.ignore)} match every Linear of the decoder blocks: nothing to quantize")
        progress = Progress(f"quantize {recipe.name}: blocks done")
        # Blocks an earlier, killed run finished keep their times (their metadata is in the partial folder).
        resumed = {i: m["seconds"] for i, m in finished_blocks(tmp / "partial").items() if isinstance(m.get("seconds"), (int, float))}
        block_seconds: dict[int, float] = dict(resumed)

        def on_block_done(index: int, total: int, meta: dict[str, Any]) -> None:
            if isinstance(meta.get("seconds"), (int, float)):
                block_seconds[index] = float(meta["seconds"])
            progress.update(index + 1, total)

        ctx = MethodContext(
            model=net,
            recipe=recipe,
            stats=load_stats(Path(stats["path"])),
            calibration=read_token_table(Path(calibration["path"]) / "samples.parquet"),
            device=pick_device(device),
            partial_dir=tmp / "partial",
            on_block_done=on_block_done,
        )
        result = REGISTRY[recipe.method].run(ctx)
        seconds = time.perf_counter() - start
        release_host_memory()  # the method's temporaries, before the checkpoint is written
        modules = len(result.weights)
        if modules == 0:
            raise QuantmillError(f"recipe {recipe.name}: method {recipe.method} quantized 0 modules; nothing committed")
        with large_frees_returned_to_os():  # the released float weights leave the resident set
            save_quantized(
                net, result.weights, recipe, tmp / "checkpoint", {**lineage(model, calibration, stats, recipe, key), **result.notes},
                tokenizer_dir=src, input_qparams=result.input_qparams, release_weights=True,
            )
        if result.report:
            columns = sorted({k for row in result.report for k in row})
            pq.write_table(pa.table({c: [json.dumps(r.get(c)) if isinstance(r.get(c), (list, dict)) else r.get(c) for r in result.report] for c in columns}), tmp / "report.parquet")
        (tmp / "report.json").write_text(json.dumps(result.report, indent=1))
        manifest = {"recipe": recipe.model_dump(mode="json"), "recipe_hash": recipe.hash, "quantize_seconds": seconds, "modules": modules, "notes": result.notes}
        if block_seconds:  # wall time per block (the engine's), including blocks of a killed earlier run
            manifest["block_seconds"] = {str(i): block_seconds[i] for i in sorted(block_seconds)}
            manifest["mean_block_seconds"] = sum(block_seconds.values()) / len(block_seconds)
        if resumed:  # quantize_seconds covers this run only; the blocks before it took sum(resumed)
            manifest["resumed_blocks"] = len(resumed)
            manifest["resumed_block_seconds"] = sum(resumed.values())
        _report_artifact(recipe, result.report, block_seconds)  # this run's work, whichever run commits first
        return Built(manifest, f"quantized {recipe.name} ({modules} modules, {seconds:.1f} s) -> key {key[:12]}")

    return Work(key, build, label=recipe.name)
