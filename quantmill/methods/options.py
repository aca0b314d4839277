"""Typed method options: one pydantic model per method, and the one-line error of a bad option.

A recipe keeps `options` as the dict the user wrote (its hash, and so every store key, is that
dict as given); the method's model validates it when the recipe loads and is what the method
reads, so each option's type, range and default live in one place: the model's field.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantmill.core.errors import RecipeError
from quantmill.core.qparams import ClipSearch
from quantmill.methods.recipe import Recipe


class MethodOptions(BaseModel):
    """The options of one method. A field's `description` says what a value must be ("an
    integer >= 1"): a type or range error reads "METHOD option NAME must be DESCRIPTION, got V".
    Checks that need their own words raise ValueError in a validator; its text is the message."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: ClassVar[str]

    @classmethod
    def known(cls) -> set[str]:
        """The option keys a recipe may write (a nested model's keys are written flat)."""
        return set(cls.model_fields)

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The recipe's keys as the model's fields (a model that nests another regroups them)."""
        return data

    def written(self) -> dict[str, Any]:
        """The options as a recipe file writes them: only what differs from the defaults (so a
        recipe made in a form hashes as the same recipe written by hand)."""
        return self.model_dump(mode="json", exclude_defaults=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys_then_prepare(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = set(data) - cls.known()
        if unknown:
            raise ValueError(f"unknown {cls.method} option(s) {sorted(unknown, key=str)} (known: {sorted(cls.known())})")
        return cls.prepare(data)


M = TypeVar("M", bound=MethodOptions)


def option_error(err: ValidationError, model: type[MethodOptions]) -> str:
    """The first error of `err` as one line naming the option and what is wrong with it."""
    first = err.errors()[0]
    if first["type"] == "value_error":
        return str(first["ctx"]["error"])
    name = str(first["loc"][0]) if first["loc"] else "options"
    field = model.model_fields.get(name)
    expects = field.description if field is not None and field.description else first["msg"]
    return f"{model.method} option {name} must be {expects}, got {first['input']!r}"


def parse_options(data: dict[str, Any], model: type[M]) -> M:
    """`data` as `model`; a bad option is a ValueError with option_error's one line (for a model
    that nests another: its before-validator calls this, and pydantic passes the text through)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ValueError(option_error(err, model)) from None


def options_of(recipe: Recipe, model: type[M]) -> M:
    """The recipe's options as `model`, or a RecipeError "recipe NAME: ..." naming the option."""
    try:
        return parse_options(recipe.options, model)
    except ValueError as err:
        raise RecipeError(f"recipe {recipe.name}: {err}") from None


class ClipOptions(MethodOptions):
    """The clipping-ratio search shared by rtn and gptq: each channel's range shrunk by the ratio
    in [clip_min_ratio, 1] (clip_grid steps) with the smallest weighted error."""

    clip_search: bool = Field(False, strict=True, description="true or false")
    clip_grid: int = Field(20, ge=1, le=1000, strict=True, description="an integer in 1..1000")
    clip_min_ratio: float = Field(0.8, gt=0, lt=1, strict=True, description="a number in (0, 1)")

    @model_validator(mode="after")
    def _tuning_needs_search(self) -> "ClipOptions":
        tuning = {"clip_grid", "clip_min_ratio"} & self.model_fields_set
        if tuning and not self.clip_search:
            raise ValueError(f"{self.method} option(s) {sorted(tuning)} need clip_search: true")
        return self

    def search(self) -> ClipSearch | None:
        """The clipping-ratio search these options ask for, or None."""
        return ClipSearch(grid=self.clip_grid, min_ratio=self.clip_min_ratio) if self.clip_search else None
