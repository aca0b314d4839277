"""Issue 18 item 4: one typed form per method, in a union on `method`: what the Prefect form
renders for a custom recipe. Every built-in recipe goes through it unchanged, a bad option is
refused by the form itself, and a new registry entry appears in the form on its own."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from quantmill.core.errors import RecipeError
from quantmill.methods.options import options_of
from quantmill.methods.recipe_files import builtin_recipes, load_recipe
from quantmill.methods.recipe_forms import FORMS, RecipeForm, options_field, recipe_from_form
from quantmill.methods.registry import REGISTRY

FORM = TypeAdapter(RecipeForm)


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_goes_through_its_form_unchanged(name):
    recipe = load_recipe(name)
    data = recipe.model_dump(mode="json", exclude={"gate"})
    data[options_field(recipe.method)] = data.pop("options")
    form = FORM.validate_python(data)
    assert type(form) is FORMS[recipe.method]
    back = recipe_from_form(form)
    written = options_of(recipe, REGISTRY[recipe.method].options).written()  # the options minus their defaults
    assert back == recipe.model_copy(update={"options": written, "gate": None})
    if written == recipe.options:  # a file that writes only what it changes: the same hash, the same store entries
        assert back.hash == recipe.hash


def test_gptq_options_nested_in_the_form_are_written_flat_as_in_a_recipe_file():
    form = FORM.validate_python({"method": "awq", "name": "a", "weights": {"bits": 4, "granularity": "group", "group_size": 64},
                                 "awq_options": {"quantizer": "gptq", "gptq": {"blocksize": 64, "actorder": True}}})
    recipe = recipe_from_form(form)
    assert recipe.options == {"quantizer": "gptq", "blocksize": 64, "actorder": True}
    assert recipe.hash == load_recipe_text_hash("method: awq\nname: a\nweights: {bits: 4, granularity: group, group_size: 64}\noptions: {quantizer: gptq, blocksize: 64, actorder: true}\n")


def load_recipe_text_hash(text: str) -> str:
    from quantmill.methods.recipe_files import parse_recipe_text

    return parse_recipe_text(text, "test").hash


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"method": "gptq", "name": "g", "weights": {"bits": 4}, "gptq_options": {"blocksize": 0}}, "1 validation error for function-wrap[_by_method()]\ngptq_options.blocksize\n  Input should be greater than or equal to 1"),
        ({"method": "rtn_lsq", "name": "l", "weights": {"bits": 4}, "rtn_lsq_options": {"candidates": 99}}, "rtn_lsq_options.candidates\n  Input should be less than or equal to 50"),
        ({"method": "awq", "name": "a", "weights": {"bits": 4}, "awq_options": {"gptq": {"blocksize": 64}}}, "option(s) ['blocksize'] apply to quantizer: gptq only"),
        ({"method": "magic", "name": "m", "weights": {"bits": 4}}, "unknown method 'magic' (known: rtn, gptq, llm_int8, awq, smoothquant, rtn_lsq)"),
        ({"method": "rtn", "name": "bad name!", "weights": {"bits": 4}}, "name\n  String should match pattern"),
    ],
)
def test_the_form_refuses_a_bad_option_or_method(data, needle):
    with pytest.raises(ValidationError) as err:
        FORM.validate_python(data)
    assert needle in str(err.value)


def test_what_only_the_load_checks_know_is_refused_when_the_form_becomes_a_recipe():
    form = FORM.validate_python({"method": "rtn_lsq", "name": "asym", "weights": {"bits": 4, "symmetric": False}})
    with pytest.raises(RecipeError, match=r"^recipe the form's custom recipe: rtn_lsq quantizes symmetric integer weights"):
        recipe_from_form(form)


def test_the_schema_offers_every_registered_method_with_its_typed_options():
    schema = FORM.json_schema()
    titles = [schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]["title"] for ref in schema["anyOf"]]
    assert titles == list(REGISTRY)  # one picker button per method, in the registry's order
    gptq = schema["$defs"]["gptq_recipe"]["properties"]
    assert gptq["method"]["const"] == "gptq"
    options = schema["$defs"][gptq["gptq_options"]["$ref"].rsplit("/", 1)[1]]["properties"]
    assert options["blocksize"]["description"] == "an integer >= 1" and options["blocksize"]["minimum"] == 1
