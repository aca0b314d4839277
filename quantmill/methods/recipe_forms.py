"""A recipe as a typed form: one model per registered method, joined in a union on `method`.

The Prefect UI renders a union of objects as a picker (one button per method, titled by its
name) over that method's own fields: the weight scheme, the activations, and the method's
options model with each option's type, default, range and description. So a custom recipe can be
written in the browser without YAML, and a bad option is refused by the form before a run exists.

The union is built from REGISTRY, so a new method appears in the form with no change here. It is
an `anyOf`, not pydantic's discriminated `oneOf`: the UI renders only the former as a picker;
each member's `method` is a one-value Literal, so validation still picks the member by it.

A form becomes a `Recipe` through the recipe file's own parser (`recipe_from_form`), with its
options written as a recipe file writes them (flat, only what differs from the defaults): it has
the hash, and so the store entries, of a recipe file that writes only the options it changes
(a file that spells out a default value hashes differently, as before: the hash is the file's dict).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidatorFunctionWrapHandler, WrapValidator, create_model

from quantmill.methods.recipe import RECIPE_NAME_PATTERN, ActivationScheme, Recipe, WeightScheme
from quantmill.methods.recipe_files import parse_recipe
from quantmill.methods.registry import REGISTRY, Method

def _form_model(name: str, method: Method) -> type[BaseModel]:
    """The form of one method's recipes: the recipe's fields, `method` fixed, typed options."""
    return create_model(
        f"{name}_recipe",
        __config__=ConfigDict(extra="forbid", frozen=True, title=name),
        __doc__=f"A recipe of method {name}.",
        method=(Literal[name], Field(name, title="Method")),
        name=(str, Field(pattern=RECIPE_NAME_PATTERN, title="Recipe name", description="its results are registered as NAME-RECIPE")),
        description=(str, Field("", title="Description")),
        weights=(WeightScheme, Field(title="Weights")),
        activations=(ActivationScheme | None, Field(None, title="Activations", description="none: weight-only")),
        ignore=(list[str], Field(["lm_head"], title="Ignore", description="module names or re:REGEX left in float")),
        # A default instance, not a factory: the schema then carries it, and the UI fills it in
        # when the method is picked (so the picked member is the one it shows).
        **{options_field(name): (method.options, Field(method.options(), title=f"{name} options"))},
    )


def options_field(method: str) -> str:
    """The options' field in a method's form: named after the method, because the UI tells the
    members of the union apart by their fields' names (a shared `options` made it show the first
    member's options whichever method was picked)."""
    return f"{method}_options"


FORMS: dict[str, type[BaseModel]] = {name: _form_model(name, method) for name, method in REGISTRY.items()}


def _by_method(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Validate against the member `method` names only, so an error is that method's (one line
    per bad field), not one per member of the union."""
    method = value.get("method") if isinstance(value, dict) else getattr(value, "method", None)
    if isinstance(value, dict) and method not in FORMS:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(FORMS)})")
    if isinstance(value, dict):
        return FORMS[method].model_validate(value)
    return handler(value)


RecipeForm = Annotated[Union[tuple(FORMS.values())], WrapValidator(_by_method)]  # type: ignore[valid-type]  # noqa: UP007 (an anyOf: the form's picker)
_FORM: TypeAdapter[Any] = TypeAdapter(RecipeForm)


def recipe_from_form(form: BaseModel | dict[str, Any], origin: str = "the form's custom recipe") -> Recipe:
    """The Recipe a form (a member of RecipeForm, or its dict) describes, checked as a recipe
    file is (errors name `origin`)."""
    if isinstance(form, dict):
        form = _FORM.validate_python(form)
    field = options_field(form.method)  # type: ignore[attr-defined]
    data = form.model_dump(mode="json", exclude={field})
    data["options"] = getattr(form, field).written()
    return parse_recipe(data, origin)
