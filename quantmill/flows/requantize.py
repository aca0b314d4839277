"""The requantize flow: find checkpoints that are new since the last scan and start a run of the
`quantize` deployment for each (checkpoint revision, recipe) that has no registered version yet.

A watch file (YAML) names the sources and the recipes each should get:

    deployment: quantize/quantize        # optional: the deployment to start (FLOW/DEPLOYMENT)
    sources:
      - dir: /data/checkpoints           # every sub-folder with a config.json is a checkpoint
        recipes: [w8a16-rtn, w4a16-gptq-g64]
        register_as: acme-7b             # registered models acme-7b-w8a16-rtn, ...
        settle_seconds: 60               # optional: skip a folder written to in the last minute
      - hf: acme/llama-7b@main           # the branch is resolved to its commit
        recipes: [w8a16-rtn]
        register_as: llama-7b
      - mlflow: models:/base-7b@production   # a new version behind the alias
        recipes: [w8a16-rtn]
        register_as: base-7b
        parameters: {calibration: {samples: 128}, device: cuda}   # optional: more quantize parameters

"Already done" is read from the registry, not from a state file of our own: a registered version
carries the lineage tags `quantmill.key.resolve_model` (the content address of the checkpoint)
and `quantmill.recipe_hash`. A pair whose run is still scheduled or running is skipped too.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantmill.core.errors import QuantmillError
from quantmill.flows.params import NAME_PATTERN, ui
from quantmill.flows.quantize import quantize_flow
from quantmill.methods.recipe_files import builtin_recipes, load_recipe
from quantmill.tasks.registry import client, resolve_model_uri
from quantmill.tasks.resolve import hub_commit, resolve_key

EVENT = "quantmill.checkpoint.detected"
DEFAULT_DEPLOYMENT = "quantize/quantize"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


class WatchSource(BaseModel):
    """One place new checkpoints appear, and what each of them should get."""

    model_config = ConfigDict(extra="forbid")

    dir: str | None = None
    hf: str | None = None
    mlflow: str | None = None
    recipes: list[str] = Field(min_length=1)
    register_as: str = Field(pattern=NAME_PATTERN)
    allow_pickle: bool = False
    settle_seconds: float = Field(60.0, ge=0)
    parameters: dict[str, Any] = Field(default_factory=dict)

    @field_validator("recipes")
    @classmethod
    def _built_in(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in builtin_recipes()]
        if unknown:  # the quantize form takes built-in names only
            raise ValueError(f"unknown recipe {unknown[0]!r} (built-in: `quantmill recipes`)")
        return names

    @model_validator(mode="after")
    def _one_kind(self) -> "WatchSource":
        kinds = [k for k in ("dir", "hf", "mlflow") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("each source needs exactly one of dir, hf, mlflow")
        if self.mlflow and not re.match(r"^models:/[^\s@/]+@[\w.-]+$", self.mlflow):
            raise ValueError(f"mlflow source {self.mlflow!r} must look like models:/NAME@ALIAS")
        if self.hf and not re.match(r"^(hf:)?[\w.-]+/[\w.-]+(@[^\s@]+)?$", self.hf):
            raise ValueError(f"hf source {self.hf!r} must look like ORG/NAME[@BRANCH]")
        reserved = {"model", "recipes", "recipe_yaml", "register_as", "allow_pickle"} & set(self.parameters)
        if reserved:
            raise ValueError(f"parameters may not set {', '.join(sorted(reserved))} (the watch file decides those)")
        return self

    @property
    def label(self) -> str:
        return f"dir:{self.dir}" if self.dir else f"hf:{self.hf.removeprefix('hf:')}" if self.hf else str(self.mlflow)


class WatchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    deployment: str = Field(DEFAULT_DEPLOYMENT, pattern=r"^[^/]+/[^/]+$")
    sources: list[WatchSource] = Field(min_length=1)


def _load_watch(path: str | Path) -> WatchFile:
    """The watch file, validated; a one-line QuantmillError naming the bad field otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QuantmillError(f"watch file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
        return WatchFile.model_validate(data)
    except yaml.YAMLError as err:
        raise QuantmillError(f"watch file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "watch file"
        raise QuantmillError(f"watch file {path}: {where}: {first['msg']}") from None


def load_watch(path: str | Path) -> WatchFile:
    """The watch file, validated, each source's extra quantize parameters included (against the
    quantize deployment's parameter schema, as the server will: a bad one fails the scan at once,
    not each run it would start)."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    spec = _load_watch(path)
    schema = parameter_schema(quantize_flow).model_dump_for_openapi()
    for i, src in enumerate(spec.sources):
        unknown = sorted(set(src.parameters) - set(schema["properties"]))
        if unknown:
            raise QuantmillError(f"watch file {path}: sources.{i}.parameters: unknown quantize parameter {unknown[0]!r} (known: {', '.join(schema['properties'])})")
        try:
            validate({"model": "demo", "recipes": src.recipes, **src.parameters}, schema, raise_on_error=True)
        except Exception as err:  # "Validation failed for field 'device'. Failure reason: ..."
            raise QuantmillError(f"watch file {path}: sources.{i}.parameters: {str(err).splitlines()[0]}") from None
    return spec


@dataclass(frozen=True)
class Checkpoint:
    """One revision of a checkpoint: the source string a quantize run gets, pinned."""

    watched: str  # the watch entry's label
    source: str  # what the quantize run resolves (a folder, hf:ORG/NAME@COMMIT, models:/NAME/VERSION)
    revision: str  # content key, commit or registry version
    key: str  # its resolve_model stage key (the registered versions' lineage tag)


def _newest_mtime(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=folder.stat().st_mtime)


def scan_source(src: WatchSource) -> list[Checkpoint]:
    """The checkpoints a source holds now, each keyed as resolve_model would key it."""
    logger = get_run_logger()
    if src.dir:
        root = Path(src.dir).expanduser()
        if not root.is_dir():
            raise QuantmillError(f"watched folder not found: {src.dir}")
        found = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()):
            if time.time() - _newest_mtime(sub) < src.settle_seconds:
                logger.info(f"{sub}: written to in the last {src.settle_seconds:g} s; next scan")
                continue
            try:
                key = resolve_key(str(sub.resolve()), src.allow_pickle)  # file hashes: a changed file is a new key
            except QuantmillError as err:
                logger.warning(f"{sub}: skipped ({err})")
                continue
            found.append(Checkpoint(src.label, str(sub.resolve()), key, key))
        return found
    if src.hf:
        repo, _, branch = src.hf.removeprefix("hf:").partition("@")
        commit = hub_commit(repo, branch or None)
        source = f"hf:{repo}@{commit}"
        return [Checkpoint(src.label, source, commit, resolve_key(source))]
    version_uri, _ = resolve_model_uri(str(src.mlflow))
    return [Checkpoint(src.label, version_uri, version_uri, resolve_key(version_uri))]


def _hex_or_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value):  # MLflow's filter strings have no escape for quotes
        raise QuantmillError(f"cannot search the registry for {value!r}")
    return value


def registered(model_name: str, key: str, recipe_hash: str) -> bool:
    """Whether a version of MODEL_NAME already carries this checkpoint's and recipe's lineage."""
    query = (
        f"name = '{_hex_or_name(model_name)}' AND tags.`quantmill.key.resolve_model` = '{_hex_or_name(key)}'"
        f" AND tags.`quantmill.recipe_hash` = '{_hex_or_name(recipe_hash)}'"
    )
    return bool(client().search_model_versions(query, max_results=1))


def pair_tag(key: str, recipe_hash: str, register_as: str) -> str:
    """The flow-run tag that names one (checkpoint, recipe, registered name) pair."""
    return "quantmill.pair:" + hashlib.sha256(f"{key}:{recipe_hash}:{register_as}".encode()).hexdigest()[:20]


def in_flight(tag: str) -> bool:
    """A run for this pair that has not finished (scheduled, pending, running, paused, retrying)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[tag]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType(t) for t in TERMINAL])),
            ),
            limit=1,
        )
    return bool(runs)


@flow(name="requantize", log_prints=True)
def requantize_flow(
    watch: Annotated[str, Field(min_length=1, examples=["/srv/quantmill/watch.yaml"], json_schema_extra=ui("Watch file", "Path (on the machine that runs the flow) of the YAML file naming the sources to watch and the recipes each gets."))],
) -> dict[str, Any]:
    """Scan the watched sources; start a quantize run per new (checkpoint, recipe); emit an event."""
    from prefect.deployments import run_deployment
    from prefect.events import emit_event

    logger = get_run_logger()
    spec = load_watch(watch)
    started: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    errors: list[str] = []
    for src in spec.sources:
        try:
            checkpoints = scan_source(src)
        except QuantmillError as err:  # one bad source must not starve the others
            errors.append(f"{src.label}: {err}")
            logger.error(f"{src.label}: {err}")
            continue
        for ckpt in checkpoints:
            runs = []
            for name in src.recipes:
                recipe = load_recipe(name)
                model_name = f"{src.register_as}-{recipe.name}"
                tag = pair_tag(ckpt.key, recipe.hash, src.register_as)
                row = {"source": ckpt.source, "revision": ckpt.revision, "recipe": recipe.name, "registered_model": model_name}
                if registered(model_name, ckpt.key, recipe.hash):
                    skipped.append({**row, "reason": "registered"})
                    continue
                if in_flight(tag):
                    skipped.append({**row, "reason": "run in flight"})
                    continue
                parameters = {**src.parameters, "model": ckpt.source, "recipes": [recipe.name], "register_as": src.register_as, "allow_pickle": src.allow_pickle}
                try:
                    run = run_deployment(spec.deployment, parameters=parameters, timeout=0, tags=["quantmill", "requantize", tag])
                except Exception as err:  # no such deployment, server refused: the other pairs still start
                    errors.append(f"{ckpt.source} x {recipe.name}: cannot start {spec.deployment}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                    logger.error(errors[-1])
                    continue
                logger.info(f"{ckpt.source} ({ckpt.revision[:16]}) x {recipe.name}: started flow run {run.name} ({run.id})")
                started.append({**row, "flow_run_id": str(run.id)})
                runs.append(str(run.id))
            if runs:
                emit_event(
                    event=EVENT,
                    resource={"prefect.resource.id": f"quantmill.checkpoint.{ckpt.key}", "prefect.resource.name": ckpt.source, "quantmill.source": ckpt.source, "quantmill.revision": ckpt.revision},
                    payload={"source": ckpt.source, "watched": ckpt.watched, "revision": ckpt.revision, "resolve_model_key": ckpt.key, "flow_run_ids": runs},
                )
    if started or skipped:
        create_table_artifact(key="requantize-scan", table=[{**r, "action": "started"} for r in started] + [{**r, "action": "skipped"} for r in skipped], description=f"requantize scan of {watch}")
    logger.info(f"{len(started)} quantize runs started, {len(skipped)} pairs skipped")
    if errors:
        raise QuantmillError(f"{len(errors)} problem(s) in this scan: {'; '.join(errors)}")
    return {"started": started, "skipped": skipped}
