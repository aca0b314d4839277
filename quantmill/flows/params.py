"""The quantize flow's parameters as a form people can fill in, and every check that needs no model.

The parameter schema (enums, patterns, bounds) lets the Prefect server refuse a bad flow run at
creation; `check_request` is the rest (recipe YAML, files that must exist, CUDA present, the
sequence length against a local model's config). The flow calls it before its first task and
the CLI before it starts a flow run, so both fail the same way, with the same one-line reason.
The defaults and bounds of the calibration and evaluation forms, the default recipes and the
devices are quantmill/tasks/specs.py's (the CLI's options read them there too).
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from quantmill.core.errors import DatasetError, QuantmillError, RecipeError, SourceError
from quantmill.io.sources import ModelSource, load_tokenizer, validate_source
from quantmill.methods.recipe import Recipe
from quantmill.methods.recipe_files import builtin_recipes, load_recipe, parse_recipe, yaml_documents
from quantmill.methods.recipe_forms import RecipeForm, recipe_from_form
from quantmill.model.arch import check_quantizable_type
from quantmill.model.calibration import load_text, parse_spec, tokenize_prefix
from quantmill.tasks.specs import DEFAULT_RECIPES, DEVICES, CalibrationSpec, EvaluationSpec, ui  # noqa: F401  (DEFAULT_RECIPES, ui: imported from here)
from quantmill.tasks.store import Store

RecipeName = Literal[tuple(builtin_recipes())]  # type: ignore[valid-type]  # the form's multi-select
Device = Literal[DEVICES]  # type: ignore[valid-type]

SOURCE_HELP = (
    "Which model to quantize. One of: `demo` (the embedded SmolLM2-135M); `hf:ORG/NAME` or "
    "`hf:ORG/NAME@REVISION` (a Hugging Face repo; a branch is resolved to its commit); "
    "`models:/NAME@ALIAS` or `models:/NAME/VERSION` (the MLflow registry); an absolute path to a "
    "checkpoint folder (config.json + *.safetensors) or to a `.gguf` file on the machine that runs the flow."
)
# The forms above; a local path is anything without a colon (no look-ahead: pydantic's regex
# engine has none), so `hf:NAME` without an org, or `models:NAME`, fails here.
SOURCE_PATTERN = (
    r"^(demo|hf:[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s@]+)?|models:/[^\s@/]+(@[\w.-]+|/[0-9]+)"
    r"|[^\s:][^:]*)$"
)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def _none_is_empty(value: Any) -> Any:
    return "" if value is None else value


# The form is the stages' spec (one model: one set of defaults and bounds, quantmill/tasks/specs.py).
CalibrationForm = CalibrationSpec
EvaluationForm = EvaluationSpec


# The flow's parameter types: what the form shows and what the server checks at creation.
ModelParam = Annotated[str, Field(pattern=SOURCE_PATTERN, examples=["demo", "hf:HuggingFaceTB/SmolLM2-135M@main", "models:/base-llama@production", "/data/checkpoints/step-1000"], json_schema_extra=ui("Model source", SOURCE_HELP))]
RecipesParam = Annotated[list[RecipeName], Field(json_schema_extra=ui("Built-in recipes", "One quantization per recipe chosen (list: `quantmill recipes`); the shared stages run once.", uniqueItems=True))]
# Plain strings, "" for none: the form then shows a text box instead of a "str | None" switch.
CustomRecipeParam = Annotated[
    RecipeForm | None,
    Field(json_schema_extra=ui("Custom recipe", "Optional: one recipe made here. Pick its method, then its weights, activations and the method's own options (each with its default and range); None: no custom recipe.")),
]
RecipeYamlParam = Annotated[str, BeforeValidator(_none_is_empty), Field(max_length=200_000, examples=["name: my-w4-g32\nmethod: rtn\nweights: {bits: 4, granularity: group, group_size: 32}"], json_schema_extra=ui("Extra recipes (YAML)", "Optional: one recipe mapping, a list of them, or several YAML documents, in the recipe format of recipes/*.yaml."))]
CalibrationParam = Annotated[CalibrationSpec, Field(json_schema_extra=ui("Calibration", "The text the quantizers see."))]
EvaluationParam = Annotated[EvaluationSpec, Field(json_schema_extra=ui("Evaluation", "The text the quantized model is compared with the original on."))]
RegisterParam = Annotated[str, BeforeValidator(_none_is_empty), Field(pattern=f"^$|{NAME_PATTERN}", max_length=200, examples=["smollm2-135m"], json_schema_extra=ui("Register as", "Register each result in MLflow as model NAME-RECIPE (alias `candidate`); empty: do not register."))]
DeviceParam = Annotated[Device, Field(json_schema_extra=ui("Device", "Where decoder blocks run: auto (CUDA when present), cpu or cuda."))]
# The flows' form field: an empty value (None, from a cleared form) is "auto".
FormDeviceParam = Annotated[DeviceParam, BeforeValidator(lambda v: "auto" if v is None else v)]
PickleParam = Annotated[bool, Field(json_schema_extra=ui("Allow pickle weights", "Accept a checkpoint whose only weights are pickle files (can run code: only for sources you trust)."))]


@dataclass(frozen=True)
class Plan:
    """A request that passed every check: what the flow's tasks get."""

    source: ModelSource
    recipes: list[Recipe]
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    device: str | None  # None: the tasks choose (CUDA when present)


INLINE_RECIPES_MAX_BYTES = 200_000


def inline_recipes(text: str | None, origin: str = "recipe_yaml") -> list[Recipe]:
    """Recipes written into the form: one mapping, a list of mappings, or several YAML documents."""
    if not text or not text.strip():
        return []
    # The recipe files' limits (size, no anchors or aliases: a few lines of aliases expand to
    # gigabytes), with room for several recipes.
    docs = [d for d in yaml_documents(text, origin, max_bytes=INLINE_RECIPES_MAX_BYTES) if d is not None]
    items = [x for d in docs for x in (d if isinstance(d, list) else [d])]
    return [parse_recipe(item, f"{origin}[{i}]" if len(items) > 1 else origin) for i, item in enumerate(items)]


def _check_source_syntax(model: str) -> None:
    if not re.match(SOURCE_PATTERN, model):
        raise SourceError(f"model source {model!r} is not one of: demo, hf:ORG/NAME[@REV], models:/NAME@ALIAS, models:/NAME/VERSION, a path")


def _local_config(source: ModelSource) -> dict[str, Any]:
    """A local folder's config.json (no model loaded); {} for other sources or an unreadable file
    (resolve_model names what is wrong with it)."""
    if source.kind != "dir":
        return {}
    try:
        config = json.loads((Path(source.target) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _max_positions(config: dict[str, Any]) -> int | None:
    value = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


MAX_CHECKED_DATASET_BYTES = 256 * 2**20  # larger files are checked for existence only, then read once by their stage


def _check_dataset_file(what: str, spec: str, samples: int, seq_len: int, source: ModelSource) -> None:
    """A dataset file must be readable, parse (every jsonl line, the parquet column) and hold at
    least `samples` x `seq_len` tokens: a token is at least one byte, and a local model's own
    tokenizer gives the exact count. Built-in and hub texts are checked by their stage."""
    parsed = parse_spec(spec)
    if parsed.kind != "file":
        return
    path = Path(parsed.target)
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as err:
        raise DatasetError(f"{what} dataset {path}: cannot be read ({err.strerror})") from None
    if size > MAX_CHECKED_DATASET_BYTES:
        return
    text = load_text(parsed)
    need = samples * seq_len
    where = f"{what} dataset {spec}"
    if len(text.encode("utf-8")) < need:
        raise DatasetError(f"{where} is too short: {len(text.encode('utf-8'))} bytes of text cannot give {samples} x {seq_len} = {need} tokens")
    if source.kind == "dir" and (Path(source.target) / "tokenizer_config.json").is_file():
        try:
            tokenizer = load_tokenizer(Path(source.target))
        except Exception:  # resolve names a tokenizer that does not load; here it only sharpens a count
            return
        have = tokenize_prefix(tokenizer, text, need).numel()
        if have < need:
            raise DatasetError(f"{where} is too short: {have} tokens, need {samples} x {seq_len} = {need}")


def check_writable_folder(folder: Path, what: str) -> None:
    """Create `folder` if needed and write (then remove) a probe file in it: a read-only or full
    disk is named before any work rather than after the first stage."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise QuantmillError(f"{what} {folder} is not writable ({err.strerror or err})") from None


def _form(cls: type[BaseModel], name: str, value: Any) -> Any:
    try:
        return cls.model_validate(value or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join([name, *(str(p) for p in first["loc"])])
        raise QuantmillError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def _check_device(device: str | None) -> str | None:
    if device in (None, "auto"):
        return None
    if device not in DEVICES:
        raise QuantmillError(f"unknown device {device!r} (use {', '.join(DEVICES[:-1])} or {DEVICES[-1]})")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise QuantmillError("device 'cuda' asked for, but this machine has no CUDA device (use auto or cpu)")
    return device


def check_request(
    model: str,
    recipes: list[str],
    recipe_yaml: str | None = None,
    calibration: CalibrationSpec | dict | None = None,
    evaluation: EvaluationSpec | dict | None = None,
    device: str | None = None,
    allow_pickle: bool = False,
    register_as: str | None = None,
    custom_recipe: BaseModel | dict | None = None,
) -> Plan:
    """Every check that needs no model loaded, in the order a user reads the form; the first
    failure is a QuantmillError naming the bad value. `recipes` may hold built-in names or YAML
    paths (the CLI's `--recipe`); the form offers names only."""
    _check_source_syntax(model)
    source = validate_source(model, allow_pickle)
    plans = [load_recipe(r) for r in recipes] + inline_recipes(recipe_yaml) + ([recipe_from_form(custom_recipe)] if custom_recipe is not None else [])
    names = [r.name for r in plans]
    if len(set(names)) != len(names):
        raise RecipeError(f"recipe names must be unique (one registered model each): {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    for raw in (calibration, evaluation):  # the spec parser's message names the forms
        dataset = raw.dataset if isinstance(raw, BaseModel) else raw.get("dataset") if isinstance(raw, dict) else None
        if isinstance(dataset, str):
            parse_spec(dataset)
    calib = _form(CalibrationSpec, "calibration", calibration)
    evals = _form(EvaluationSpec, "evaluation", evaluation)
    config = _local_config(source)
    if isinstance(config.get("model_type"), str):
        check_quantizable_type(config["model_type"])
    limit = _max_positions(config)
    for what, length in (("calibration", calib.seq_len), ("evaluation", evals.seq_len)):
        if limit is not None and length > limit:
            raise QuantmillError(f"{what} seq_len {length} exceeds the model's max_position_embeddings {limit} ({model})")
    store = Store()
    check_writable_folder(store.root, "the store (QUANTMILL_HOME)" if store.remote is None else f"the local cache of the store {store.location}")
    if store.remote is not None:
        store.remote.check()
    _check_dataset_file("calibration", calib.dataset, calib.samples, calib.seq_len, source)
    _check_dataset_file("evaluation", evals.dataset, evals.windows, evals.seq_len, source)
    if register_as and not re.match(NAME_PATTERN, register_as):
        raise QuantmillError(f"register name {register_as!r} must match {NAME_PATTERN}")
    return Plan(source, plans, calib, evals, _check_device(device))


def split_recipes(recipes: list[str]) -> tuple[list[str], str | None]:
    """The CLI's `--recipe` values (names or YAML files) as the flow's two parameters: built-in
    names, and the files' recipes as one YAML list (the same recipes, so the same hashes)."""
    known = builtin_recipes()
    names = [r for r in recipes if r in known and not Path(r).is_file()]
    files = [load_recipe(r).model_dump(mode="json") for r in recipes if r not in names]
    return names, (yaml.safe_dump(files, sort_keys=False) if files else None)


# The sweep flow's own parameters (quantmill/flows/sweep.py); the rest of its form is the quantize flow's.
DASK_ADDRESS_PATTERN = r"^$|^((tcp|tls|ucx|ws|wss|inproc)://)?[^\s/:]+(:[0-9]+)?$"
ModelsParam = Annotated[list[ModelParam], Field(min_length=1, max_length=100, json_schema_extra=ui("Model sources", "One or more models, each as the quantize flow's model source: `demo`, `hf:ORG/NAME[@REVISION]`, `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or an absolute path on the machines that run the flow.", uniqueItems=True))]
RegisterPrefixParam = Annotated[str, BeforeValidator(_none_is_empty), Field(pattern=f"^$|{NAME_PATTERN}", max_length=100, examples=["sweep"], json_schema_extra=ui("Register prefix", "Register each result in MLflow as model PREFIX-MODEL-RECIPE (MODEL: the source's name, e.g. the folder's; alias `candidate`); empty: do not register."))]
DaskAddressParam = Annotated[str, BeforeValidator(_none_is_empty), Field(pattern=DASK_ADDRESS_PATTERN, max_length=300, examples=["tcp://10.0.0.5:8786"], json_schema_extra=ui("Dask scheduler", "Address of a running Dask scheduler whose workers run the recipes (they need quantmill installed and the same QUANTMILL_HOME, MLFLOW_TRACKING_URI and PREFECT_API_URL); empty: a local cluster on this machine."))]
DaskWorkersParam = Annotated[int, Field(ge=1, le=64, json_schema_extra=ui("Local workers", "Worker processes of the local cluster (one thread each); ignored with a scheduler address."))]
