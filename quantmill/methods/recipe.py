"""Recipes: the whole description of one quantization, as data (YAML validated by pydantic).

The recipe hash (sha256 of its canonical JSON, description excluded) is part of the quantize
stage key, so editing a recipe file makes a new entry and never overwrites an old one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quant.errors import RecipeError
from quant.hashing import canonical_json, sha256_text
from quant.observers import get_observer

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightScheme(_Strict):
    """How Linear weights are quantized."""

    bits: int = Field(ge=2, le=8)
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int | None = Field(default=None, gt=0)
    # A layer whose input width the group size does not divide: fail, or keep it per-channel.
    indivisible: Literal["error", "channel"] = "error"

    @model_validator(mode="after")
    def _group_size_matches(self) -> "WeightScheme":
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size is only for granularity 'group', not {self.granularity!r}")
        if self.type == "float" and self.bits != 8:
            raise ValueError("float weights are fp8: bits must be 8")
        if self.type == "float" and (self.granularity == "group" or not self.symmetric):
            raise ValueError("fp8 weights are symmetric, per tensor or per channel")
        return self


class ActivationScheme(_Strict):
    """How Linear inputs are quantized at run time (absent: weight-only)."""

    bits: int = 8
    type: Literal["int", "float"] = "int"
    dynamic: bool = True
    granularity: Literal["token", "tensor"] = "token"
    symmetric: bool = True
    observer: str = "minmax"
    observer_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _eight_bits(self) -> "ActivationScheme":
        if self.bits != 8:
            raise ValueError(f"activation bits must be 8 for {self.type} activations, got {self.bits}")
        if self.dynamic and self.granularity != "token":
            raise ValueError("dynamic activations are quantized per token: set granularity: token")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError("static activations have one scale per tensor: set granularity: tensor")
        if self.type == "float" and not self.symmetric:
            raise ValueError("fp8 activations are symmetric")
        if self.dynamic and (self.observer != "minmax" or self.observer_options):
            raise ValueError("observer and observer_options apply to static activations only (dynamic: false)")
        if self.type == "float" and self.observer in ("mse", "kl"):
            raise ValueError(f"observer {self.observer!r} models an integer grid; fp8 activations use minmax, ema_minmax or percentile")
        try:
            get_observer(self.observer, **self.observer_options)
        except RecipeError as err:
            raise ValueError(str(err)) from None
        return self


class QualityGate(_Strict):
    """Limits a result must meet to get an alias: a failing one is registered, marked failed,
    and cannot be promoted. Every version also passes a generation smoke test (tasks/gate.py)."""

    max_ppl_ratio: float | None = Field(default=None, gt=1.0, title="Highest ppl ratio", description="highest quantized / float perplexity allowed")
    max_kl: float | None = Field(default=None, gt=0.0, title="Highest KL", description="highest mean KL(P_float || P_quantized) allowed")
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0, title="Lowest top-1 agreement", description="lowest share of unchanged top-1 next tokens allowed")

    def merged(self, override: "QualityGate | None") -> "QualityGate":
        """This gate with the limits `override` sets replacing ours (a flow or CLI parameter wins)."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    method: str
    weights: WeightScheme
    activations: ActivationScheme | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    options: dict[str, Any] = Field(default_factory=dict)
    gate: QualityGate | None = None

    @model_validator(mode="after")
    def _same_number_type(self) -> "Recipe":
        a = self.activations
        if a is not None and a.type != self.weights.type:
            raise ValueError(f"activations.type {a.type!r} must match weights.type {self.weights.type!r} (int8 x int8 or fp8 x fp8)")
        return self

    @property
    def hash(self) -> str:
        """What the quantized tensors depend on: the gate only decides registration, so changing
        it never recomputes a quantization (and hashes stay as they were before gates existed)."""
        body = self.model_dump(mode="json", exclude={"description"})
        body["gate"] = None
        return sha256_text(canonical_json(body))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "recipe"
    return f"{where}: {first['msg']}"


def parse_recipe(data: Any, origin: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {origin}: expected a mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"recipe {origin}: {_first_error(err)}") from None
    from quant.methods import METHODS, check_recipe  # the registry imports recipe types; import late

    if recipe.method not in METHODS:
        raise RecipeError(f"recipe {origin}: unknown method {recipe.method!r} (known: {', '.join(sorted(METHODS))})")
    try:
        check_recipe(recipe)  # ignore patterns compile, method options known and in range: before any work
    except RecipeError as err:
        raise RecipeError(f"recipe {origin}: {err}") from None
    return recipe


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


# A recipe is a screenful of YAML; 64 KiB is far above any real one and far below what would
# hurt. Aliases are refused: a few lines of nested aliases (a "billion laughs") expand to
# gigabytes when the recipe is hashed, long after validation passed in milliseconds.
MAX_RECIPE_BYTES = 64 * 1024


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors and aliases (a recipe never needs them)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            what = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise RecipeError(f"line {event.start_mark.line + 1}: YAML {what}{event.anchor} (anchors and aliases are not allowed in recipes)")
        return super().compose_node(parent, index)


def yaml_documents(text: str, origin: str, max_bytes: int = MAX_RECIPE_BYTES) -> list[Any]:
    """Every YAML document of `text` (inline recipes from a form or a flow parameter), with the
    recipe file's limits: size-limited, anchors and aliases refused; errors name `origin`."""
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise RecipeError(f"{origin}: {size} bytes, more than the {max_bytes} allowed")
    try:
        return list(yaml.load_all(text, Loader=_NoAliasLoader))  # noqa: S506 (a SafeLoader subclass)
    except RecipeError as err:
        raise RecipeError(f"{origin}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{origin}: not valid YAML ({str(err).splitlines()[0]})") from None


def parse_recipe_text(text: str | bytes, origin: str) -> Recipe:
    """A recipe from YAML text (a file's bytes, or inline YAML from a form), size-limited and
    alias-free, validated; every error is one line starting with `recipe ORIGIN:`."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe {origin}: {size} bytes, more than the {MAX_RECIPE_BYTES} a recipe may have")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(f"recipe {origin}: not UTF-8 text (byte 0x{text[err.start]:02x} at offset {err.start})") from None
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecipeError as err:
        raise RecipeError(f"recipe {origin}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {origin}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_recipe(data, origin)


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {name_or_path}")
    else:
        known = builtin_recipes()
        if name_or_path not in known:
            raise RecipeError(f"unknown recipe {name_or_path!r} (built-in: {', '.join(known)})")
        path = known[name_or_path]
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:  # refused before reading: /dev/zero-sized files never load
            raise RecipeError(f"recipe {path}: {size} bytes, more than the {MAX_RECIPE_BYTES} a recipe may have")
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(f"recipe {path}: cannot read ({err.strerror})") from None
    return parse_recipe_text(raw, str(path))
