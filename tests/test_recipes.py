"""Recipes as data: built-ins load and round-trip; bad files are one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quant.errors import QuantmillError, RecipeError
from quant.methods import METHODS
from quant.recipe import RECIPES_DIR, Recipe, builtin_recipes, load_recipe, parse_recipe

BUILTINS = sorted(builtin_recipes())

VALID = {
    "name": "w4-test",
    "description": "a recipe for tests",
    "method": "rtn",
    "weights": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32},
    "ignore": ["lm_head"],
}


def _write(tmp_path: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


def _error(path: Path) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_builtin_recipes_are_the_yaml_files_by_stem() -> None:
    assert BUILTINS, "no built-in recipes found"
    assert {p.name for p in RECIPES_DIR.glob("*.yaml")} == {f"{n}.yaml" for n in BUILTINS}
    assert "w4a16-rtn" in BUILTINS and "w8a16-rtn" in BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_recipe_loads_by_name_and_by_path_with_its_file_name(name) -> None:
    recipe = load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert recipe.name == name  # the file name is the name users type
    assert recipe.method in METHODS
    assert load_recipe(str(builtin_recipes()[name])) == recipe


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_recipe_round_trips_through_yaml_with_the_same_hash(name, tmp_path) -> None:
    recipe = load_recipe(name)
    text = recipe.to_yaml()
    again = parse_recipe(yaml.safe_load(text), "round-trip")
    assert again == recipe and again.hash == recipe.hash
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert load_recipe(str(path)).hash == recipe.hash
    assert again.to_yaml() == text


def test_builtin_recipes_have_distinct_hashes() -> None:
    hashes = {load_recipe(n).hash for n in BUILTINS}
    assert len(hashes) == len(BUILTINS)


def test_hash_ignores_description_but_not_bits_or_other_fields() -> None:
    base = parse_recipe(VALID, "test")
    assert len(base.hash) == 64
    assert parse_recipe({**VALID, "description": "something else"}, "test").hash == base.hash
    assert parse_recipe({k: v for k, v in VALID.items() if k != "description"}, "test").hash == base.hash
    assert parse_recipe({**VALID, "weights": {**VALID["weights"], "bits": 8}}, "test").hash != base.hash
    assert parse_recipe({**VALID, "weights": {**VALID["weights"], "group_size": 64}}, "test").hash != base.hash
    assert parse_recipe({**VALID, "name": "w4-other"}, "test").hash != base.hash
    assert parse_recipe({**VALID, "ignore": ["lm_head", "re:.*down_proj"]}, "test").hash != base.hash


def test_defaults_are_part_of_the_hash_not_their_spelling() -> None:
    spelled = {**VALID, "weights": {**VALID["weights"], "type": "int", "indivisible": "error"}, "options": {}}
    assert parse_recipe(spelled, "test").hash == parse_recipe(VALID, "test").hash


def test_unknown_recipe_name_lists_the_builtins() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("w3a16-magic")
    message = str(err.value)
    assert "\n" not in message and "'w3a16-magic'" in message
    for name in BUILTINS:
        assert name in message


def test_missing_recipe_file_is_an_error(tmp_path) -> None:
    for missing in (tmp_path / "nope.yaml", tmp_path / "nope.yml"):
        message = _error(missing)
        assert "not found" in message and str(missing) in message


@pytest.mark.parametrize(
    "change, field",
    [
        ({"weights": {"bits": 9, "granularity": "channel"}}, "weights.bits"),
        ({"weights": {"bits": 1, "granularity": "channel"}}, "weights.bits"),
        ({"weights": {"bits": 4, "granularity": "group"}}, "group_size"),
        ({"weights": {"bits": 4, "granularity": "channel", "group_size": 64}}, "group_size"),
        ({"weights": {"bits": 4, "granularity": "group", "group_size": 0}}, "weights.group_size"),
        ({"weights": {"bits": 4, "granularity": "row"}}, "weights.granularity"),
        ({"weights": {"bits": 4, "type": "float"}}, "bits must be 8"),
        ({"colour": "blue"}, "colour"),
        ({"weights": {"bits": 4, "granularity": "channel", "scale": 2}}, "weights.scale"),
        ({"activations": {"bits": 4}}, "activations"),
        ({"name": "bad name!"}, "name"),
        ({"gate": {"max_ppl_ratio": 0.9}}, "gate.max_ppl_ratio"),
    ],
)
def test_invalid_recipe_file_is_a_one_line_error_naming_the_field(tmp_path, change, field) -> None:
    data = {**VALID, **change}
    path = _write(tmp_path, data)
    message = _error(path)
    assert field in message
    assert str(path) in message


def test_activation_bits_4_says_activations_must_be_8_bit(tmp_path) -> None:
    message = _error(_write(tmp_path, {**VALID, "activations": {"bits": 4}}))
    assert "activations" in message and "8" in message and "4" in message


def test_unknown_method_lists_the_known_methods(tmp_path) -> None:
    message = _error(_write(tmp_path, {**VALID, "method": "magic"}))
    assert "unknown method 'magic'" in message
    for name in METHODS:
        assert name in message


def test_missing_required_field_is_named(tmp_path) -> None:
    data = {k: v for k, v in VALID.items() if k != "method"}
    assert "method" in _error(_write(tmp_path, data))


def test_recipe_that_is_not_a_mapping_is_an_error(tmp_path) -> None:
    assert "expected a mapping" in _error(_write(tmp_path, "- just\n- a list\n"))


def test_recipe_that_is_not_yaml_is_an_error(tmp_path) -> None:
    assert "not valid YAML" in _error(_write(tmp_path, "name: [unclosed\nmethod: rtn\n"))


def test_recipes_are_frozen_values() -> None:
    recipe = parse_recipe(VALID, "test")
    with pytest.raises(Exception):
        recipe.method = "gptq"  # type: ignore[misc]
    assert isinstance(RecipeError("x"), QuantmillError)
