"""The quantize flow: resolve -> calibrate -> stats (shared) -> quantize -> evaluate -> register (per recipe).

Its parameters are the form of the `quantize` deployment (quantmill/flows/params.py); everything that can be
checked without a model is checked before the first task, so a bad value fails at once.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from pydantic import BeforeValidator, Field

from quantmill.flows.params import (
    DEFAULT_RECIPES,
    CalibrationForm,
    CalibrationParam,
    CustomRecipeParam,
    FormDeviceParam,
    EvaluationForm,
    EvaluationParam,
    ModelParam,
    PickleParam,
    RecipesParam,
    RecipeYamlParam,
    RegisterParam,
    check_request,
    ui,
)
from quantmill.methods.recipe import QualityGate, Recipe
from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec, capture_calibration
from quantmill.tasks.evaluate import evaluate
from quantmill.tasks.gate import check_gate, effective_gate
from quantmill.tasks.quantize import quantize
from quantmill.tasks.registry import RegistryError, experiment_id, register, tracking_uri
from quantmill.tasks.resolve import resolve_model
from quantmill.tasks.stats import collect_stats

LONG_COLUMNS = ("quantized_key", "checkpoint")  # the results table shows these last
GPU_LIMIT = "gpu"  # the global concurrency limit that keeps quantize runs on one host apart

# A plain object, not `QualityGate | None`: the form shows its three limits at once (an optional
# object renders as a type switch); leaving them empty means no limit, and None is still accepted.
GateParam = Annotated[
    QualityGate,
    BeforeValidator(lambda v: QualityGate() if v is None else v),
    Field(json_schema_extra=ui("Quality gate", "Optional limits: a result worse than any of them is registered as failed, without an alias (in addition to a recipe's own gate). Leave empty for none.")),
]


def _run(task, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], bool, str]:
    """Run a task; report whether it was served from cache (Prefect's or the store's)."""
    state = task(*args, return_state=True, **kwargs)
    result = state.result()
    return result, state.name == "Cached" or bool(result.get("reused")), state.name


def run_stage(stages: list[dict[str, Any]], label: str, task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a stage task, record in `stages` whether it was computed or cached, and log it."""
    result, cached, state = _run(task, *args, **kwargs)
    stages.append({"stage": label, "key": result.get("key") or result.get("uri"), "cached": cached, "prefect_state": state})
    get_run_logger().info(f"{label}: {'cached' if cached else 'computed'} {result.get('key') or result.get('uri')}")
    return result


METRIC_COLUMNS = ("ppl", "ppl_ratio", "ppl_ratio_ci95_low", "ppl_ratio_ci95_high", "kl", "kl_ci95_low", "kl_ci95_high", "top1_agreement", "size_mb", "bits_per_weight", "quantize_seconds", "seconds", "max_abs_logit_diff")


@dataclass
class SharedStages:
    """What every recipe of one model builds on: its manifests from the store."""

    resolved: dict[str, Any]
    calib: dict[str, Any]
    stats: dict[str, Any]
    reference: dict[str, Any]  # the float model's evaluation


def run_shared(model: str, allow_pickle: bool, calibration_spec: CalibrationSpec, evaluation_spec: EvaluationSpec, device: str | None, stages: list[dict[str, Any]]) -> SharedStages:
    """resolve -> calibrate -> stats, and the float reference evaluation: once per model."""
    run = lambda label, task, *args, **kwargs: run_stage(stages, label, task, *args, **kwargs)
    resolved = run("resolve_model", resolve_model, model, allow_pickle)
    calib = run("capture_calibration", capture_calibration, resolved, calibration_spec)
    stats = run("collect_stats", collect_stats, resolved, calib, device)
    reference = run("evaluate float", evaluate, resolved, evaluation_spec, None, device)
    return SharedStages(resolved, calib, stats, reference)


@dataclass
class RecipeOutcome:
    """One recipe's result row, its registered version, and a registry failure (as its one-line
    message: the sweep sends outcomes back from Dask workers, so they must pickle plainly)."""

    row: dict[str, Any]
    registered: dict[str, Any] | None = None
    registry_error: str | None = None


def run_recipe(
    recipe: Recipe,
    shared: SharedStages,
    evaluation_spec: EvaluationSpec,
    device: str | None,
    gate: QualityGate | None,
    register_as: str,
    stages: list[dict[str, Any]],
) -> RecipeOutcome:
    """quantize -> evaluate -> check_gate -> register for one recipe, on the shared stages'
    results; the quantize and sweep flows both call it. A registry failure is kept as a pending
    registration and reported in the outcome, so the other recipes still run."""
    run = lambda label, task, *args, **kwargs: run_stage(stages, label, task, *args, **kwargs)
    q = run(f"quantize {recipe.name}", quantize, shared.resolved, shared.calib, shared.stats, recipe, device)
    metrics = run(f"evaluate {recipe.name}", evaluate, shared.resolved, evaluation_spec, q, device)["manifest"]["metrics"]
    row = {"recipe": recipe.name, **{k: metrics.get(k) for k in METRIC_COLUMNS}}
    verdict = run(f"gate {recipe.name}", check_gate, q, metrics, effective_gate(recipe.gate, gate))
    row["gate"] = verdict["status"]
    row["gate_reasons"] = "; ".join(verdict["reasons"]) or None
    row["quantized_key"] = q["key"]
    row["checkpoint"] = q["path"] + "/checkpoint"
    if not register_as:
        return RecipeOutcome(row)
    try:
        reg = run(f"register {recipe.name}", register, register_as, q, metrics, shared.reference["manifest"]["metrics"], verdict, evaluation_spec.model_dump())
    except RegistryError as err:
        get_run_logger().error(str(err))
        return RecipeOutcome({**row, "uri": None}, registry_error=str(err))
    return RecipeOutcome({**row, "uri": reg["uri"]}, registered=reg)


def gpu_slot() -> AbstractContextManager[Any]:
    """A slot of the global concurrency limit `gpu` when the server has one (`quantmill serve`
    creates it), so runs sharing one accelerator never overlap; nothing to hold otherwise."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    except ObjectNotFound:
        return nullcontext()
    return concurrency(GPU_LIMIT, occupy=1)


def reference_row(fp: dict[str, Any]) -> dict[str, Any]:
    """The float model's row of a results table, from its evaluation metrics."""
    return {"recipe": "float (reference)", "ppl": fp.get("ppl"), "ppl_ratio": 1.0, "size_mb": fp.get("size_mb"), "seconds": fp.get("seconds")}


def table_cells(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every column any row has (a new key in a row appears without a change here), for every row."""
    columns: list[str] = []
    for row in table:
        columns += [k for k in row if k not in columns]
    columns = [c for c in columns if c not in LONG_COLUMNS] + [c for c in columns if c in LONG_COLUMNS]  # readable first
    # an em dash, not "-": the UI renders cells as markdown, where "-" is a list bullet
    cell = lambda v: "\u2014" if v is None else round(v, 4) if isinstance(v, float) else v if isinstance(v, (int, str, bool)) else str(v)
    return [{c: cell(row.get(c)) for c in columns} for row in table]


def results_table(fp: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The float reference, then one row per recipe."""
    return table_cells([reference_row(fp)] + rows)


def _mlflow_ui() -> str | None:
    """The MLflow web UI's base URL: the tracking server itself, or $QUANTMILL_MLFLOW_UI."""
    import os

    uri = os.environ.get("QUANTMILL_MLFLOW_UI") or tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def links_markdown(registered: list[dict[str, Any]]) -> str:
    """Links to each MLflow run and model version (plain URIs when MLflow has no web UI)."""
    base = _mlflow_ui()
    lines = ["| model version | MLflow run |", "|---|---|"]
    for reg in registered:
        if base:
            version = f"[{reg['uri']}]({base}/#/models/{reg['name']}/versions/{reg['version']})"
            run = f"[{reg['run_id']}]({base}/#/experiments/{experiment_id()}/runs/{reg['run_id']})"
        else:
            version, run = f"`{reg['uri']}`", f"`{reg['run_id']}`"
        lines.append(f"| {version} | {run} |")
    if not base:
        lines.append(f"\nMLflow tracking: `{tracking_uri()}` (no web UI; `mlflow ui --backend-store-uri {tracking_uri()}` shows it).")
    return "\n".join(lines)


def publish_artifacts(
    prefix: str, results: list[dict[str, Any]], description: str, stages: list[dict[str, Any]], registered: list[dict[str, Any]], markdowns: dict[str, tuple[str, str]] | None = None
) -> None:
    """A run's artifacts, the same for both flows: `PREFIX-results` (the table), any extra
    markdown ones (`PREFIX-SUFFIX`: suffix -> (markdown, description)), `PREFIX-stages` (cached or
    computed) and, when something was registered, `PREFIX-mlflow` (the links)."""
    logger = get_run_logger()
    try:
        create_table_artifact(key=f"{prefix}-results", table=results, description=description)
        for suffix, (markdown, text) in (markdowns or {}).items():
            create_markdown_artifact(key=f"{prefix}-{suffix}", markdown=markdown, description=text)
        create_table_artifact(key=f"{prefix}-stages", table=[{**s, "cached": "cached" if s["cached"] else "computed"} for s in stages], description="each stage: served from the store (cached) or computed")
        if registered:
            create_markdown_artifact(key=f"{prefix}-mlflow", markdown=links_markdown(registered), description="MLflow runs and model versions")
    except Exception as err:  # an artifact is a nicety; the results are in the return value
        logger.warning(f"could not create the {prefix} artifacts: {err}")


@flow(name="quantize", log_prints=True)
def quantize_flow(
    model: ModelParam = "demo",
    recipes: RecipesParam = DEFAULT_RECIPES,
    recipe_yaml: RecipeYamlParam = "",
    custom_recipe: CustomRecipeParam = None,
    calibration: CalibrationParam = CalibrationForm(),
    evaluation: EvaluationParam = EvaluationForm(),
    register_as: RegisterParam = "",
    gate: GateParam = QualityGate(),
    allow_pickle: PickleParam = False,
    device: FormDeviceParam = "auto",
) -> dict[str, Any]:
    """Quantize one model with several recipes; shared stages run once, every stage is cached."""
    plan = check_request(model, list(recipes), recipe_yaml, calibration, evaluation, device, allow_pickle, register_as, custom_recipe)
    plans, calibration_spec, evaluation_spec, device_ = plan.recipes, plan.calibration, plan.evaluation, plan.device
    stages: list[dict[str, Any]] = []
    registered: list[dict[str, Any]] = []
    registry_errors: list[RegistryError] = []

    with gpu_slot():
        shared = run_shared(model, allow_pickle, calibration_spec, evaluation_spec, device_, stages)
        resolved, reference = shared.resolved, shared.reference
        rows = []
        for recipe in plans:
            outcome = run_recipe(recipe, shared, evaluation_spec, device_, gate, register_as, stages)
            rows.append(outcome.row)
            if outcome.registered:
                registered.append(outcome.registered)
            if outcome.registry_error:
                registry_errors.append(RegistryError(outcome.registry_error))
    fp = reference["manifest"]["metrics"]
    summary = {
        "model": model,
        "model_key": resolved["key"],
        "flow_run_id": str(flow_run.get_id()),
        "reference": {"ppl": fp["ppl"], "size_mb": fp["size_mb"], "seconds": fp["seconds"]},
        "rows": rows,
        "stages": stages,
    }
    publish_artifacts("quantize", results_table(fp, rows), f"quantmill results for {model}", stages, registered)
    if registry_errors:
        raise registry_errors[0]
    return summary
