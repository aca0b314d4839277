"""register: one MLflow run per (model, recipe) and an immutable registered model version.

Tracking goes to $MLFLOW_TRACKING_URI when set, else a SQLite file and an artifact folder under
$QUANTMILL_HOME/mlflow. A version is never overwritten: re-registering the same quantized entry
finds the version that carries its key and returns it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from prefect import task

from quant.errors import QuantmillError, SourceError
from quant.recipe import Recipe
from tasks.common import log, store
from tasks.report import layer_metrics, plot_output_error

EXPERIMENT = "quantmill"
CANDIDATE_ALIAS = "candidate"


def _mlflow():
    warnings.filterwarnings("ignore", message=".*noload.*")
    import mlflow

    return mlflow


# mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment; URIs that quantmill
# chose itself must not then be mistaken for the user's choice (a later run with another
# QUANTMILL_HOME would log into the old home).
_DEFAULT_URIS: set[str] = set()


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri not in _DEFAULT_URIS:
        return uri
    folder = store().root / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    default = f"sqlite:///{folder / 'mlflow.db'}"
    _DEFAULT_URIS.add(default)
    return default


def client():
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient(tracking_uri())


def experiment_id() -> str:
    c = client()
    found = c.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        location = (store().root / "mlflow" / "artifacts").resolve().as_uri()
    return c.create_experiment(EXPERIMENT, artifact_location=location)


def resolve_model_uri(uri: str) -> tuple[str, str]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (models:/NAME/VERSION, its checkpoint URI)."""
    body = uri[len("models:/") :]
    c = client()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = c.get_model_version_by_alias(name, alias)
        else:
            name, number = body.rsplit("/", 1)
            version = c.get_model_version(name, number)
    except Exception as err:  # MlflowException for unknown names/aliases
        raise SourceError(f"cannot resolve {uri}: {str(err).splitlines()[0]}") from None
    return f"models:/{version.name}/{version.version}", version.source


def download_model(version_uri: str, dst: Path) -> Path:
    mlflow = _mlflow()
    mlflow.set_tracking_uri(tracking_uri())
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version_uri, dst_path=str(dst)))


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def gate_failures(recipe: Recipe, metrics: dict[str, Any]) -> list[str]:
    gate = recipe.gate
    if gate is None:
        return []
    failed = []
    if gate.max_ppl_ratio is not None and metrics["ppl_ratio"] > gate.max_ppl_ratio:
        failed.append(f"ppl ratio {metrics['ppl_ratio']:.4f} > {gate.max_ppl_ratio}")
    if gate.min_top1_agreement is not None and metrics["top1_agreement"] < gate.min_top1_agreement:
        failed.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {gate.min_top1_agreement}")
    return failed


def lineage_tags(quantized: dict[str, Any], lineage: dict[str, Any]) -> dict[str, str]:
    tags = {
        "quantmill.quantized_key": quantized["key"],
        "quantmill.recipe": lineage["recipe"],
        "quantmill.recipe_hash": lineage["recipe_hash"],
        "quantmill.source": lineage["source"],
        "quantmill.resolved_revision": str(lineage.get("resolved_revision")),
        "quantmill.calibration_text_sha256": lineage["calibration_text_sha256"],
        "quantmill.version": lineage["quantmill_version"],
        "quantmill.prefect_flow_run_id": str(lineage.get("prefect_flow_run_id")),
    }
    for stage, key in lineage["stage_keys"].items():
        tags[f"quantmill.key.{stage}"] = key
    for name, digest in sorted(lineage["source_file_hashes"].items()):
        if name.endswith((".safetensors", "config.json")):
            tags[f"quantmill.file.{name}"] = digest
    return tags


def log_layer_report(run_id: str, rows: list[dict[str, Any]], title: str = "", block_seconds: dict[str, float] | None = None) -> int:
    """The per-module report as MLflow metrics with step = block index (`layer.<module suffix>.<field>`
    for each module, `block.<field>` for the block's mean) and a PNG of relative output error by
    block (`layer_report/rel_output_error.png`); with `block_seconds` ({block: s}) also
    `block.seconds`. Returns the number of metric values logged."""
    import tempfile
    import time

    from mlflow.entities import Metric

    values = layer_metrics(rows)
    values += [("block.seconds", float(v), int(b)) for b, v in sorted((block_seconds or {}).items(), key=lambda kv: int(kv[0]))]
    now = int(time.time() * 1000)
    metrics = [Metric(key=name, value=value, timestamp=now, step=step) for name, value, step in values]
    c = client()
    for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
        c.log_batch(run_id, metrics=metrics[i : i + 1000])
    with tempfile.TemporaryDirectory() as scratch:
        png = plot_output_error(rows, Path(scratch) / "rel_output_error.png", title=title)
        if png is not None:
            c.log_artifact(run_id, str(png), artifact_path="layer_report")
    return len(metrics)


def log_outlier_report(lineage: dict[str, Any]) -> list[str]:
    """The stats entry's outlier report (heat map, outlier-channel bars, table) as artifacts under
    `outliers/` of the active run; returns the files logged (none when the entry has no report)."""
    from quant.outlier_report import REPORT_FILES

    key = (lineage.get("stage_keys") or {}).get("collect_stats")
    entry = store().get("collect_stats", key) if key else None
    if entry is None:
        return []
    files = [entry.path / f for f in REPORT_FILES if (entry.path / f).is_file()]
    for f in files:
        _mlflow().log_artifact(str(f), artifact_path="outliers")
    return [f.name for f in files]


@task(name="register")
def register(name: str, quantized: dict[str, Any], metrics: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Log the run and register a version (alias `candidate`), or return the existing version."""
    import json

    c = client()
    recipe = Recipe.model_validate(quantized["manifest"]["recipe"])
    model_name = f"{name}-{recipe.name}"
    try:
        c.get_registered_model(model_name)
    except Exception:
        c.create_registered_model(model_name, description=f"{name} quantized with recipe {recipe.name} by quantmill")
    for version in c.search_model_versions(f"name='{model_name}'"):
        if version.tags.get("quantmill.quantized_key") == quantized["key"]:
            log(f"reused registered version models:/{model_name}/{version.version}")
            return {"name": model_name, "version": version.version, "uri": f"models:/{model_name}/{version.version}", "run_id": version.run_id, "reused": True}
    failed = gate_failures(recipe, metrics)
    if failed:
        raise QuantmillError(f"recipe {recipe.name} failed its quality gate: {'; '.join(failed)}; not registered")
    qdir = Path(quantized["path"]) / "checkpoint"
    lineage = json.loads((qdir / "quantmill.json").read_text())
    mlflow = _mlflow()
    with mlflow.start_run(experiment_id=experiment_id(), run_name=model_name) as run:
        params = _flat("recipe", recipe.model_dump(mode="json", exclude={"description"}), {})
        params.update({"source": lineage["source"], "calibration": json.dumps(lineage["calibration_spec"])})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        numeric["reference_ppl_full"] = float(reference["ppl"])
        mlflow.log_metrics(numeric)
        mlflow.set_tags(lineage_tags(quantized, lineage))
        mlflow.log_artifacts(str(qdir), artifact_path="checkpoint")
        report = Path(quantized["path"]) / "report.json"
        if report.is_file():
            mlflow.log_artifact(str(report))
            log_layer_report(run.info.run_id, json.loads(report.read_text()), title=f"{model_name}: relative output error by block", block_seconds=quantized["manifest"].get("block_seconds"))
        log_outlier_report(lineage)
        run_id = run.info.run_id
    version = c.create_model_version(model_name, source=f"runs:/{run_id}/checkpoint", run_id=run_id, tags=lineage_tags(quantized, lineage))
    c.set_registered_model_alias(model_name, CANDIDATE_ALIAS, version.version)
    uri = f"models:/{model_name}/{version.version}"
    log(f"registered {uri} (alias {CANDIDATE_ALIAS})")
    return {"name": model_name, "version": version.version, "uri": uri, "run_id": run_id, "reused": False}
