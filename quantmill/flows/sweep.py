"""The sweep flow: many models x many recipes, each recipe's work a task on a Dask cluster.

Per model, resolve -> calibrate -> stats and the float evaluation run once, in the flow, and go
to the store; each (model, recipe) then runs quantize -> evaluate -> gate -> register (the
quantize flow's `run_recipe`) as one task on a Dask worker through prefect-dask, reading the
shared stages from the store by the manifests it is handed. A worker therefore needs the same
store, MLflow and Prefect API as the flow: a local cluster gets them in its environment; the
workers of a remote scheduler must be started with them (checked before any work).
At the end: a table of every result and a size-vs-perplexity plot with the Pareto front.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

from distributed import get_worker
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect_dask import DaskTaskRunner

from quantmill.core.errors import QuantmillError
from quantmill.eval.plots import pareto_front, size_vs_ppl
from quantmill.flows.params import (
    DEFAULT_RECIPES,
    CalibrationForm,
    CalibrationParam,
    CustomRecipeParam,
    DaskAddressParam,
    DaskWorkersParam,
    FormDeviceParam,
    EvaluationForm,
    EvaluationParam,
    ModelsParam,
    PickleParam,
    Plan,
    RecipesParam,
    RecipeYamlParam,
    RegisterPrefixParam,
    check_request,
)
from quantmill.flows.quantize import (
    GateParam,
    RecipeOutcome,
    SharedStages,
    gpu_slot,
    publish_artifacts,
    reference_row,
    run_recipe,
    run_shared,
    table_cells,
)
from quantmill.io.sources import ModelSource
from quantmill.methods.recipe import QualityGate, Recipe
from quantmill.tasks.calibrate import EvaluationSpec
from quantmill.tasks.registry import RegistryError, experiment_id, tracking_uri
from quantmill.tasks.tracking import check_model_name
from quantmill.tasks.store import default_root

PLOT = "size_vs_ppl.png"
SWEEPS = "sweeps"  # <QUANTMILL_HOME>/sweeps/<flow run id>/: each sweep's plot (the store ignores the folder)


def model_label(source: ModelSource, model: str) -> str:
    """A short name for a model source, usable in a registered-model name: the repo, folder or
    registered name, with the revision, alias or version when one is given."""
    if source.kind == "demo":
        raw = "demo"
    elif source.kind == "hf":
        raw = source.target.split("/")[-1] + (f"-{source.revision}" if source.revision else "")
    elif source.kind == "mlflow":
        raw = model[len("models:/") :].replace("@", "-").replace("/", "-")
    else:
        raw = os.path.basename(source.target.rstrip("/"))
        raw = raw[: -len(".gguf")] if raw.endswith(".gguf") else raw
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._") or "model"


def check_sweep(
    models: list[str], recipes: list[str], recipe_yaml: str, calibration: Any, evaluation: Any, device: str, allow_pickle: bool, register_prefix: str, custom_recipe: Any = None
) -> dict[str, tuple[Plan, str]]:
    """check_request for every model before any work; model -> (its plan, its register name)."""
    if len(set(models)) != len(models):
        raise QuantmillError(f"models must be unique: {', '.join(sorted({m for m in models if models.count(m) > 1}))}")
    checked: dict[str, tuple[Plan, str]] = {}
    for model in models:
        plan = check_request(model, list(recipes), recipe_yaml, calibration, evaluation, device, allow_pickle, custom_recipe=custom_recipe)
        name = f"{register_prefix}-{model_label(plan.source, model)}" if register_prefix else ""
        for recipe in plan.recipes if name else []:
            check_model_name(f"{name}-{recipe.name}")  # a long prefix and label can pass MLflow's length
        checked[model] = (plan, name)
    names = [name for _, name in checked.values() if name]
    for name in {n for n in names if names.count(n) > 1}:
        clash = [m for m, (_, n) in checked.items() if n == name]
        raise QuantmillError(f"models {' and '.join(clash)} would register under the same name {name}-RECIPE: sweep them separately or rename one")
    return checked


def worker_env(registering: bool) -> dict[str, str]:
    """What a local cluster's worker processes must see as the flow does: the store, MLflow,
    the Prefect API, and passive OpenMP waits (quantmill/core/threads.py) before torch loads."""
    env = {"QUANTMILL_HOME": str(default_root()), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if registering or os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = tracking_uri()
    if PREFECT_API_URL.value():
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return env


def dask_runner(address: str, n_workers: int, registering: bool) -> DaskTaskRunner:
    """A remote scheduler's workers, or a local cluster of `n_workers` one-thread processes."""
    if address:
        return DaskTaskRunner(address=address)
    cluster = {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "env": worker_env(registering)}
    return DaskTaskRunner(cluster_kwargs=cluster)


def worker_facts(registering: bool) -> dict[str, str | None]:
    """Run on each worker: importing this module proves quantmill imports there; the store and
    the MLflow registry it would use."""
    return {"QUANTMILL_HOME": str(default_root()), "MLflow": tracking_uri() if registering else None}


def connect(runner: DaskTaskRunner, address: str, n_workers: int, registering: bool) -> None:
    """Start (or reach) the cluster before any work, and check every worker uses this flow's
    store and registry (a worker on another store would not find the shared stages)."""
    try:
        client = runner.client
        if not address:
            client.wait_for_workers(n_workers, timeout=300)
        facts = client.run(worker_facts, registering)
    except Exception as err:  # unreachable, no workers in time, or workers that cannot import quantmill
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QuantmillError(f"dask cluster {address or '(local)'}: {type(err).__name__}: {reason}") from None
    if not facts:
        raise QuantmillError(f"dask scheduler {address} has no workers: start some (`dask worker {address}`) with quantmill installed")
    ours = worker_facts(registering)
    for worker, theirs in facts.items():
        for what in ("QUANTMILL_HOME", "MLflow"):
            if theirs[what] != ours[what]:
                raise QuantmillError(f"dask worker {worker} uses {what}={theirs[what]}, this flow {ours[what]}: workers must share the flow's store and registry")


@task(name="sweep-recipe", task_run_name="{label} {recipe.name}", cache_policy=NO_CACHE, persist_result=False)
def sweep_recipe(
    label: str,
    recipe: Recipe,
    shared: SharedStages,
    evaluation_spec: EvaluationSpec,
    device: str | None,
    gate: QualityGate | None,
    register_as: str,
) -> tuple[RecipeOutcome, list[dict[str, Any]]]:
    """One (model, recipe) on a Dask worker; its stage tasks cache on their store keys as ever.
    It holds a slot of the `gpu` limit when the server has one: raise that limit to the number
    of accelerators the workers share."""
    stages: list[dict[str, Any]] = []
    with gpu_slot():
        outcome = run_recipe(recipe, shared, evaluation_spec, device, gate, register_as, stages)
    outcome.row["worker"] = get_worker().address  # which machine did it, in the results table
    return outcome, stages


def _plot_markdown(path: str, front: list[dict[str, Any]]) -> str:
    """The plot inline (a data URI: the UI cannot read the worker's disk) and the front as a table."""
    with open(path, "rb") as f:
        image = base64.b64encode(f.read()).decode("ascii")
    lines = [f"![size vs perplexity](data:image/png;base64,{image})", "", f"Plot file: `{path}`", "", "Pareto front (no other result is both smaller and better):", "", "| model | recipe | size (MB) | perplexity | model version |", "|---|---|---|---|---|"]
    for row in front:
        version = row.get("uri") or "\u2014"
        lines.append(f"| {row['model']} | {row['recipe']} | {row['size_mb']:.3f} | {row['ppl']:.4f} | {version} |")
    return "\n".join(lines)


@flow(name="sweep", log_prints=True)
def sweep_flow(
    models: ModelsParam = ["demo"],
    recipes: RecipesParam = DEFAULT_RECIPES,
    recipe_yaml: RecipeYamlParam = "",
    custom_recipe: CustomRecipeParam = None,
    calibration: CalibrationParam = CalibrationForm(),
    evaluation: EvaluationParam = EvaluationForm(),
    register_prefix: RegisterPrefixParam = "",
    gate: GateParam = QualityGate(),
    allow_pickle: PickleParam = False,
    device: FormDeviceParam = "auto",
    dask_address: DaskAddressParam = "",
    n_workers: DaskWorkersParam = 2,
) -> dict[str, Any]:
    """Every model x every recipe: shared stages once per model, recipes fanned out on Dask."""
    logger = get_run_logger()
    checked = check_sweep(list(models), list(recipes), recipe_yaml, calibration, evaluation, device, allow_pickle, register_prefix, custom_recipe)
    if register_prefix and tracking_uri().startswith("sqlite:"):
        experiment_id()  # the SQLite file and experiment made once here, not raced for by the workers
    stages: list[dict[str, Any]] = []
    references: dict[str, dict[str, Any]] = {}
    submitted = []
    with dask_runner(dask_address, n_workers, bool(register_prefix)) as runner:
        connect(runner, dask_address, n_workers, bool(register_prefix))
        for model, (plan, name) in checked.items():
            label = model_label(plan.source, model)
            model_stages: list[dict[str, Any]] = []
            with gpu_slot():
                shared = run_shared(model, allow_pickle, plan.calibration, plan.evaluation, plan.device, model_stages)
            stages += [{"model": model, **s} for s in model_stages]
            references[model] = {"key": shared.resolved["key"], "metrics": shared.reference["manifest"]["metrics"], "label": label}
            for recipe in plan.recipes:  # the next model's shared stages run while these do
                parameters = {"label": label, "recipe": recipe, "shared": shared, "evaluation_spec": plan.evaluation, "device": plan.device, "gate": gate, "register_as": name}
                submitted.append((model, recipe.name, runner.submit(sweep_recipe, parameters)))
        rows: list[dict[str, Any]] = []
        registered: list[dict[str, Any]] = []
        failures: list[Exception] = []
        for model, recipe_name, future in submitted:
            try:
                outcome, recipe_stages = future.result()
            except Exception as err:  # one recipe's failure leaves the others' results standing
                logger.error(f"{model} {recipe_name}: {err}")
                failures.append(err)
                continue
            rows.append({"model": model, **outcome.row})
            stages += [{"model": model, **s} for s in recipe_stages]
            registered += [outcome.registered] if outcome.registered else []
            failures += [RegistryError(outcome.registry_error)] if outcome.registry_error else []
    table = [row for model, ref in references.items() for row in [{"model": model, **reference_row(ref["metrics"])}] + [r for r in rows if r["model"] == model]]
    several = len(references) > 1
    plotted = [{**r, "recipe": f"{references[r['model']]['label']}: {r['recipe']}" if several else r["recipe"]} for r in rows]
    plot = default_root() / SWEEPS / str(flow_run.get_id()) / PLOT
    refs = [{**ref["metrics"], "label": ref["label"] if several else ""} for ref in references.values()]
    size_vs_ppl(refs, plotted, plot, title="sweep: size vs perplexity", front=True)
    front = pareto_front(rows)
    publish_artifacts(
        "sweep", table_cells(table), "quantmill sweep: every model's float reference and recipes", stages, registered,
        markdowns={"pareto": (_plot_markdown(str(plot), front), "size vs perplexity across all results, Pareto front marked")},
    )
    summary = {
        "flow_run_id": str(flow_run.get_id()),
        "models": [{"model": m, "model_key": ref["key"], "reference": {k: ref["metrics"][k] for k in ("ppl", "size_mb", "seconds")}} for m, ref in references.items()],
        "rows": rows,
        "pareto_front": [(r["model"], r["recipe"]) for r in front],
        "plot": str(plot),
        "stages": stages,
    }
    if failures:
        raise failures[0]
    return summary
