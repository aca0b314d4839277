"""Recipes: the whole description of one quantization, as data (YAML validated by pydantic).

The recipe hash (sha256 of its canonical JSON, description excluded) is part of the quantize
stage key, so editing a recipe file makes a new entry and never overwrites an old one.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantmill.core.errors import RecipeError
from quantmill.core.hashing import canonical_json, sha256_text
from quantmill.solvers.observers import get_observer

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
    and cannot be promoted. Every version also passes a generation smoke test (quantmill/tasks/gate.py)."""

    max_ppl_ratio: float | None = Field(default=None, gt=1.0, title="Highest ppl ratio", description="highest quantized / float perplexity allowed")
    max_kl: float | None = Field(default=None, gt=0.0, title="Highest KL", description="highest mean KL(P_float || P_quantized) allowed")
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0, title="Lowest top-1 agreement", description="lowest share of unchanged top-1 next tokens allowed")

    def merged(self, override: "QualityGate | None") -> "QualityGate":
        """This gate with the limits `override` sets replacing ours (a flow or CLI parameter wins)."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


RECIPE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Recipe(_Strict):
    name: str = Field(pattern=RECIPE_NAME_PATTERN)
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
