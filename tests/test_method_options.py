"""Typed method options: every method's options are a pydantic model in its registry entry, bad
ones fail when the recipe loads with one line naming recipe, option and problem, and the recipe
hash stays the options dict as written (defaults filled in by the model never reach a store key)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quantmill.core.errors import RecipeError
from quantmill.methods.awq import AwqOptions
from quantmill.methods.gptq import GptqMethodOptions
from quantmill.methods.options import MethodOptions, options_of
from quantmill.methods.recipe_files import builtin_recipes, load_recipe
from quantmill.methods.registry import REGISTRY
from quantmill.methods.smoothquant import SmoothQuantOptions


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_has_an_options_model_named_after_it(method) -> None:
    model = REGISTRY[method].options
    assert issubclass(model, MethodOptions) and model.method == method
    model.model_validate({})  # every option has a default, in the model


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_every_builtin_recipe_fits_its_method_options_model(name) -> None:
    recipe = load_recipe(name)
    options = options_of(recipe, REGISTRY[recipe.method].options)
    assert set(recipe.options) <= options.known()


def test_gptq_defaults_live_in_the_model_and_the_hash_is_the_options_as_written() -> None:
    recipe = load_recipe("w8a16-gptq")
    typed = options_of(recipe, GptqMethodOptions)
    assert (typed.blocksize, typed.percdamp, typed.actorder, typed.max_damp_tries) == (128, 0.01, False, 5)
    spelled_out = recipe.model_copy(update={"options": {**recipe.options, "actorder": False}})
    assert options_of(spelled_out, GptqMethodOptions) == typed
    assert spelled_out.hash != recipe.hash  # the hash is the user's dict: no built-in's key moved


def test_awq_and_smoothquant_take_the_gptq_options_nested_under_quantizer_gptq() -> None:
    awq = AwqOptions.model_validate({"quantizer": "gptq", "percdamp": 0.05, "grid": 10})
    assert awq.gptq == GptqMethodOptions(percdamp=0.05) and awq.grid == 10
    assert AwqOptions.model_validate({"quantizer": "rtn"}).gptq is None
    sq = options_of(load_recipe("w8a8-smoothquant-auto-gptq"), SmoothQuantOptions)
    assert sq.quantizer == "gptq" and sq.gptq == GptqMethodOptions() and sq.alpha == "auto"


def _load_error(tmp_path: Path, method: str, options: dict) -> str:
    base = load_recipe({"rtn": "w4a16-rtn", "gptq": "w8a16-gptq", "awq": "w4a16-awq-g64", "smoothquant": "w8a8-smoothquant-a05", "llm_int8": "w8-llmint8-t6"}[method])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**base.model_dump(mode="json"), "options": options}, sort_keys=False))
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"recipe {path}: ")
    return message.removeprefix(f"recipe {path}: ")


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("rtn", {"clip_grid": 10}, "rtn option(s) ['clip_grid'] need clip_search: true"),
        ("rtn", {"clip_search": True, "clip_min_ratio": 1.5}, "rtn option clip_min_ratio must be a number in (0, 1), got 1.5"),
        ("gptq", {"max_damp_tries": True}, "gptq option max_damp_tries must be an integer >= 1, got True"),
        ("llm_int8", {"zero_point": "yes"}, "llm_int8 zero_point must be true or false, got 'yes'"),
        ("awq", {"quantizer": "gptq", "percdamp": 2}, "gptq option percdamp must be a number in (0, 1], got 2"),
        ("awq", {"clip": "no"}, "awq option clip must be true or false, got 'no'"),
        ("smoothquant", {"grid": []}, "smoothquant option grid must be a non-empty list of alphas in [0, 1], got []"),
        ("smoothquant", {"v_o": 1}, "smoothquant option v_o must be true or false, got 1"),
        ("smoothquant", {"alpha": "half"}, "smoothquant alpha must be in [0, 1], got 'half' (or 'auto')"),
    ],
)
def test_a_bad_option_is_one_line_naming_the_recipe_option_and_problem(tmp_path, method, options, message) -> None:
    assert _load_error(tmp_path, method, options) == message
