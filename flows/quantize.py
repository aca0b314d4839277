"""The quantize flow: resolve -> calibrate -> stats (shared) -> quantize -> evaluate -> register (per recipe)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from quant.calibration import parse_spec
from quant.recipe import load_recipe
from quant.sources import validate_source
from tasks.calibrate import CalibrationSpec, EvaluationSpec, capture_calibration
from tasks.evaluate import evaluate
from tasks.quantize import quantize
from tasks.registry import register
from tasks.resolve import resolve_model
from tasks.stats import collect_stats

DEFAULT_RECIPES = ["w8a16-rtn", "w4a16-rtn-g64"]


def _run(task, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], bool, str]:
    """Run a task; report whether it was served from cache (Prefect's or the store's)."""
    state = task(*args, return_state=True, **kwargs)
    result = state.result()
    return result, state.name == "Cached" or bool(result.get("reused")), state.name


@flow(name="quantize", log_prints=True)
def quantize_flow(
    model: str = "demo",
    recipes: list[str] = DEFAULT_RECIPES,
    calibration: CalibrationSpec = CalibrationSpec(),
    evaluation: EvaluationSpec = EvaluationSpec(),
    register_as: str | None = None,
    allow_pickle: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Quantize one model with several recipes; shared stages run once, every stage is cached."""
    logger = get_run_logger()
    validate_source(model, allow_pickle)
    parse_spec(calibration.dataset)
    parse_spec(evaluation.dataset)
    plans = [load_recipe(r) for r in recipes]  # every recipe validated before any work starts

    stages: list[dict[str, Any]] = []

    def run(label: str, task, *args: Any, **kwargs: Any) -> dict[str, Any]:
        result, cached, state = _run(task, *args, **kwargs)
        stages.append({"stage": label, "key": result.get("key") or result.get("uri"), "cached": cached, "prefect_state": state})
        logger.info(f"{label}: {'cached' if cached else 'computed'} {result.get('key') or result.get('uri')}")
        return result

    resolved = run("resolve_model", resolve_model, model, allow_pickle)
    calib = run("capture_calibration", capture_calibration, resolved, calibration)
    stats = run("collect_stats", collect_stats, resolved, calib, device)
    reference = run("evaluate float", evaluate, resolved, evaluation, None, device)
    rows = []
    for recipe in plans:
        q = run(f"quantize {recipe.name}", quantize, resolved, calib, stats, recipe, device)
        metrics = run(f"evaluate {recipe.name}", evaluate, resolved, evaluation, q, device)["manifest"]["metrics"]
        row = {"recipe": recipe.name, **{k: metrics.get(k) for k in ("ppl", "ppl_ratio", "kl", "top1_agreement", "size_mb", "bits_per_weight", "quantize_seconds", "seconds", "max_abs_logit_diff")}}
        row["quantized_key"] = q["key"]
        row["checkpoint"] = q["path"] + "/checkpoint"
        if register_as:
            reg = run(f"register {recipe.name}", register, register_as, q, metrics, reference["manifest"]["metrics"])
            row["uri"] = reg["uri"]
        rows.append(row)
    fp = reference["manifest"]["metrics"]
    summary = {
        "model": model,
        "model_key": resolved["key"],
        "flow_run_id": str(flow_run.get_id()),
        "reference": {"ppl": fp["ppl"], "size_mb": fp["size_mb"], "seconds": fp["seconds"]},
        "rows": rows,
        "stages": stages,
    }
    try:
        create_table_artifact(
            key="quantize-results",
            table=[{"recipe": "float", "ppl": round(fp["ppl"], 4), "size_mb": round(fp["size_mb"], 1)}]
            + [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("checkpoint", "quantized_key")} for r in rows],
            description=f"quantmill results for {model}",
        )
    except Exception as err:  # an artifact is a nicety; the results are in the return value
        logger.warning(f"could not create the results artifact: {err}")
    return summary
