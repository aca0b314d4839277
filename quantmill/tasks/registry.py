"""register: one MLflow run per (model, recipe) and an immutable registered model version.

A version is an MLflow Model whose folder is the quantized checkpoint itself (quantmill/tasks/mlflow_model.py),
tagged with its lineage and the sha256 of every file in it, so `quantmill pull` can verify what
arrives against what was registered. A version is never overwritten: re-registering the same
quantized entry finds the version that carries its key and returns it. A version that fails its
quality gate is registered, marked `quantmill.gate=failed`, and gets no alias.

When the registry cannot be reached, the request is kept as a pending record in the store
(`<QUANTMILL_HOME>/pending-registrations/`); `quantmill register` replays it later, with nothing
recomputed.

A registering process killed mid-way (SIGKILL, a lost machine) cannot end its MLflow run or
remove its scratch copy; the next registration on the same host does both for it
(`close_abandoned_runs`, `remove_abandoned_scratch`): the run is marked KILLED, never deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from quantmill.core.hashing import hash_files
from quantmill.eval.outlier_report import REPORT_FILES
from quantmill.methods.recipe import Recipe
from quantmill.tasks.common import log, store
from quantmill.tasks.mlflow_model import build_model_folder
from quantmill.tasks.processes import owner_alive, owner_id, pid_alive
from quantmill.tasks.report import layer_metrics, plot_output_error
from quantmill.tasks.tracking import (
    EXPERIMENT,
    RegistryError,
    check_model_name,
    client,
    download_model,
    experiment_id,
    mlflow_module,
    resolve_model_uri,
    tracking_uri,
)

CANDIDATE_ALIAS = "candidate"
MODEL_ARTIFACT = "model"
CHECKPOINT_TAG = "quantmill.checkpoint.sha256."
SOURCE_TAG = "quantmill.source.sha256."
GATE_TAG = "quantmill.gate"
PENDING = "pending-registrations"
OWNER_TAG = "quantmill.owner"  # host:pid:start of the registering process (quantmill/tasks/processes.py)
SCRATCH = "registering"


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def lineage_tags(quantized: dict[str, Any], lineage: dict[str, Any]) -> dict[str, str]:
    """Tags that say where a version came from; `source.` hashes are of the float model that was
    quantized, never of the files a version holds (those are `checkpoint.` tags)."""
    tags = {
        "quantmill.quantized_key": quantized["key"],
        "quantmill.recipe": lineage["recipe"],
        "quantmill.recipe_hash": lineage["recipe_hash"],
        "quantmill.source": lineage["source"],
        "quantmill.source.revision": str(lineage.get("resolved_revision")),
        "quantmill.calibration.text_sha256": lineage["calibration_text_sha256"],
        "quantmill.code_version": lineage["quantmill_version"],
        "quantmill.prefect_flow_run_id": str(lineage.get("prefect_flow_run_id")),
    }
    for stage, key in lineage["stage_keys"].items():
        tags[f"quantmill.key.{stage}"] = key
    for name, digest in sorted(lineage["source_file_hashes"].items()):
        if name.endswith((".safetensors", "config.json")):
            tags[SOURCE_TAG + name] = digest
    return tags


def checkpoint_tags(hashes: dict[str, str]) -> dict[str, str]:
    return {CHECKPOINT_TAG + name: digest for name, digest in hashes.items()}


def checkpoint_hashes(tags: dict[str, str]) -> dict[str, str]:
    """The sha256 of every file of a version, as recorded at registration (empty for versions
    registered before quantmill recorded them)."""
    return {k[len(CHECKPOINT_TAG) :]: v for k, v in tags.items() if k.startswith(CHECKPOINT_TAG)}


def db_safe(value: str) -> str:
    """A string every MLflow backend stores: Postgres refuses NUL (0x00) in text (the request then
    fails with HTTP 500), and a quantized model's smoke text can hold one (a tiny or broken model
    generates any token); it is kept visible as the two characters \\0."""
    return value.replace("\x00", "\\0")


def gate_tags(gate_result: dict[str, Any] | None) -> dict[str, str]:
    if gate_result is None:
        return {GATE_TAG: "none"}
    tags = {GATE_TAG: gate_result["status"], "quantmill.gate.limits": json.dumps(gate_result.get("limits", {}))}
    if gate_result.get("reasons"):
        tags["quantmill.gate.reasons"] = "; ".join(gate_result["reasons"])[:4000]
    smoke = gate_result.get("smoke") or {}
    if smoke:
        tags["quantmill.gate.smoke_text"] = smoke.get("text", "")[:500]
    return tags


def description(model_name: str, version: str, recipe: Recipe, lineage: dict[str, Any], metrics: dict[str, Any], gate_result: dict[str, Any] | None) -> str:
    """The version page's text: what it is, how good, whether it passed, and how to load it."""
    w = recipe.weights
    scheme = f"{w.type}{w.bits} weights, {w.granularity}" + (f" {w.group_size}" if w.group_size else "") + ("" if w.symmetric else ", zero point")
    if recipe.activations is not None:
        a = recipe.activations
        scheme += f"; {a.type}{a.bits} inputs, {'dynamic per token' if a.dynamic else 'static per tensor'}"
    gate = "none set (smoke test only)" if gate_result is None else gate_result["status"] + (f": {'; '.join(gate_result['reasons'])}" if gate_result.get("reasons") else "")
    uri = f"models:/{model_name}/{version}"
    folder = f"./{model_name}-v{version}"

    def num(key: str, spec: str) -> str:
        value = metrics.get(key)
        return "-" if value is None else format(value, spec)

    return "\n".join([
        f"**{lineage['source']}** quantized by quantmill with recipe **{recipe.name}** ({recipe.method}; {scheme}).",
        "",
        f"ppl {num('ppl', '.3f')} ({num('ppl_ratio', '.4f')} x float), KL {num('kl', '.4f')}, top-1 agreement {num('top1_agreement', '.4f')}, "
        f"{num('size_mb', '.1f')} MB, {num('bits_per_weight', '.2f')} bits/weight. Quality gate: {gate}.",
        "",
        "Load it:",
        "```",
        f"quantmill pull {uri} {folder}      # verifies every file's sha256",
        f'AutoModelForCausalLM.from_pretrained("{folder}")',
        f'mlflow.pyfunc.load_model("{uri}")',
        f"mlflow models serve -m {uri} --env-manager local",
        "```",
    ])


def log_layer_report(run_id: str, rows: list[dict[str, Any]], title: str = "", block_seconds: dict[str, float] | None = None) -> int:
    """The per-module report as MLflow metrics with step = block index (`layer.<module suffix>.<field>`
    for each module, `block.<field>` for the block's mean) and a PNG of relative output error by
    block (`layer_report/rel_output_error.png`); with `block_seconds` ({block: s}) also
    `block.seconds`. Returns the number of metric values logged."""
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
    key = (lineage.get("stage_keys") or {}).get("collect_stats")
    entry = store().get("collect_stats", key) if key else None
    if entry is None:
        return []
    files = [entry.path / f for f in REPORT_FILES if (entry.path / f).is_file()]
    for f in files:
        mlflow_module().log_artifact(str(f), artifact_path="outliers")
    return [f.name for f in files]


def _existing_version(c, model_name: str, quantized_key: str):
    for version in c.search_model_versions(f"name='{model_name}'"):
        if version.tags.get("quantmill.quantized_key") == quantized_key:
            return version
    return None


def _result(model_name: str, version, reused: bool) -> dict[str, Any]:
    return {
        "name": model_name,
        "version": str(version.version),
        "uri": f"models:/{model_name}/{version.version}",
        "run_id": version.run_id,
        "gate": version.tags.get(GATE_TAG, "none"),
        "aliases": list(getattr(version, "aliases", []) or []),
        "reused": reused,
    }


def _pending_path(name: str, quantized_key: str) -> Path:
    return store().root / PENDING / f"{quantized_key[:16]}-{name}.json"


def pending_registrations() -> list[Path]:
    folder = store().root / PENDING
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _keep_pending(request: dict[str, Any]) -> Path:
    path = _pending_path(request["name"], request["quantized"]["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(request, indent=1, default=str))
    os.replace(tmp, path)
    return path


def close_abandoned_runs(c, experiment: str) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment whose registering process on this host is
    gone; returns their ids. Runs of live processes, of other hosts and without an owner stay."""
    closed = []
    for run in c.search_runs([experiment], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        owner = run.data.tags.get(OWNER_TAG)
        if owner and owner_alive(owner) is False:
            c.set_tag(run.info.run_id, "quantmill.abandoned", f"its registering process {owner} died before the run ended")
            c.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    if closed:
        log(f"marked {len(closed)} abandoned MLflow run(s) KILLED: {', '.join(closed)}")
    return closed


def remove_abandoned_scratch(root: Path) -> list[Path]:
    """Remove the `registering/<pid>-...` copies of processes that died while registering."""
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def register_version(
    name: str,
    quantized: dict[str, Any],
    metrics: dict[str, Any],
    reference: dict[str, Any],
    gate_result: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register (or find) the version of one quantized store entry. Any failure to reach or write
    the registry keeps the request as a pending record and raises one line naming the URI."""
    request = {"name": name, "quantized": quantized, "metrics": metrics, "reference": reference, "gate_result": gate_result, "evaluation": evaluation}
    check_model_name(name)
    try:
        result = _register(**request)
    except RegistryError as err:
        if "unreachable" not in str(err):
            raise  # refused for a reason a retry will not fix (a bad name): nothing to keep
        _keep_pending(request)
        raise RegistryError(f"{err}; the quantized results are kept: run `quantmill register` when it is back") from None
    except Exception as err:  # the server died mid-way, a write was refused: keep the work, say where
        _keep_pending(request)
        raise RegistryError(f"registering in {tracking_uri()} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}; the quantized results are kept: run `quantmill register` to retry") from None
    _pending_path(name, quantized["key"]).unlink(missing_ok=True)
    return result


def _register(name, quantized, metrics, reference, gate_result, evaluation) -> dict[str, Any]:
    c = client()
    recipe = Recipe.model_validate(quantized["manifest"]["recipe"])
    model_name = check_model_name(f"{name}-{recipe.name}")
    try:
        c.get_registered_model(model_name)
    except Exception:
        c.create_registered_model(model_name, description=f"{name} quantized with recipe {recipe.name} by quantmill", tags={"quantmill.recipe": recipe.name})
    found = _existing_version(c, model_name, quantized["key"])
    if found is not None:
        log(f"reused registered version models:/{model_name}/{found.version}")
        return _result(model_name, found, reused=True)
    qdir = Path(quantized["path"]) / "checkpoint"
    lineage = json.loads((qdir / "quantmill.json").read_text())
    mlflow = mlflow_module()
    scratch_root = store().root / SCRATCH
    scratch_root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_scratch(scratch_root)
    experiment = experiment_id()
    close_abandoned_runs(c, experiment)
    scratch = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-{model_name}-", dir=scratch_root))
    try:
        folder = build_model_folder(qdir, scratch / MODEL_ARTIFACT)
        hashes = hash_files(folder)
        tags = {k: db_safe(v) for k, v in {**lineage_tags(quantized, lineage), **gate_tags(gate_result)}.items()}
        with mlflow.start_run(experiment_id=experiment, run_name=model_name, tags={OWNER_TAG: owner_id()}) as run:
            params = _flat("recipe", recipe.model_dump(mode="json", exclude={"description", "gate"}), {})
            params.update({"source": lineage["source"], "calibration": json.dumps(lineage["calibration_spec"])})
            if evaluation:
                params.update({f"eval.{k}": v for k, v in evaluation.items()})
            params["eval.text_sha256"] = metrics.get("eval_text_sha256")
            mlflow.log_params({k: db_safe(str(v)[:500]) for k, v in params.items()})
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            numeric["reference_ppl_full"] = float(reference["ppl"])
            mlflow.log_metrics(numeric)
            mlflow.set_tags(tags)
            mlflow.log_artifacts(str(folder), artifact_path=MODEL_ARTIFACT)
            if gate_result is not None:
                mlflow.log_dict(gate_result, "gate.json")
            report = Path(quantized["path"]) / "report.json"
            if report.is_file():
                mlflow.log_artifact(str(report))
                log_layer_report(run.info.run_id, json.loads(report.read_text()), title=f"{model_name}: relative output error by block", block_seconds=quantized["manifest"].get("block_seconds"))
            log_outlier_report(lineage)
            run_id = run.info.run_id
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # A concurrent identical run may have registered while we uploaded: keep one version.
    found = _existing_version(c, model_name, quantized["key"])
    if found is not None:
        return _result(model_name, found, reused=True)
    version = c.create_model_version(model_name, source=f"runs:/{run_id}/{MODEL_ARTIFACT}", run_id=run_id, tags={**tags, **checkpoint_tags(hashes)})
    c.update_model_version(model_name, version.version, description=db_safe(description(model_name, version.version, recipe, lineage, metrics, gate_result)))
    uri = f"models:/{model_name}/{version.version}"
    passed = gate_result is None or gate_result["status"] == "passed"
    if passed:
        c.set_registered_model_alias(model_name, CANDIDATE_ALIAS, version.version)
        log(f"registered {uri} (alias {CANDIDATE_ALIAS})")
    else:
        log(f"registered {uri} without an alias: quality gate failed ({'; '.join(gate_result['reasons'])})")
    return _result(model_name, c.get_model_version(model_name, version.version), reused=False)


# The Prefect task: register_version, shown as `register` in the flow run.
register = task(register_version, name="register")


def register_pending(match: str = "") -> list[dict[str, Any]]:
    """Replay every pending registration whose file name contains `match`; each that succeeds is
    removed. Returns the results (a failure raises after the earlier ones are done)."""
    results = []
    for path in pending_registrations():
        if match not in path.name:
            continue
        request = json.loads(path.read_text())
        results.append(register_version(**request))
    return results
