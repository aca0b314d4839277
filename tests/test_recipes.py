"""Recipes as data: built-ins load and round-trip; bad files are one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quantmill.core.errors import QuantmillError, RecipeError
from quantmill.methods.recipe import Recipe
from quantmill.methods.recipe_files import RECIPES_DIR, builtin_recipes, load_recipe, parse_recipe
from quantmill.methods.registry import REGISTRY

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
    assert recipe.method in REGISTRY
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
    for name in REGISTRY:
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


# --------------------------------------------------------------------------- issue 17: parsing limits, load-time checks


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path) -> None:
    bomb = "name: bomb\nmethod: rtn\nweights: {bits: 8}\noptions:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  {chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    path = _write(tmp_path, bomb)
    assert _error(path) == f"recipe {path}: line 5: YAML anchor &a (anchors and aliases are not allowed in recipes)"


def test_a_yaml_alias_alone_is_refused(tmp_path) -> None:
    path = _write(tmp_path, "name: x\nmethod: rtn\nweights: {bits: 8}\nignore: *nowhere\n")
    assert _error(path).startswith(f"recipe {path}: line 4: YAML alias *nowhere")


def test_an_oversized_recipe_is_refused_before_reading(tmp_path) -> None:
    path = _write(tmp_path, "name: big\nmethod: rtn\nweights: {bits: 8}\ndescription: '" + "x" * 70000 + "'\n")
    size = path.stat().st_size
    assert _error(path) == f"recipe {path}: {size} bytes, more than the 65536 a recipe may have"


def test_inline_recipe_text_gets_the_same_limits() -> None:
    from quantmill.methods.recipe_files import parse_recipe_text

    with pytest.raises(RecipeError, match=r"^recipe form: line 1: YAML anchor &a"):
        parse_recipe_text("x: &a 1\ny: *a\n", "form")
    assert parse_recipe_text("name: w8\nmethod: rtn\nweights: {bits: 8}\n", "form").name == "w8"


def test_a_recipe_that_is_not_utf8_names_the_file_and_byte(tmp_path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\nmethod: rtn\n".encode("latin-1"))
    assert _error(path) == f"recipe {path}: not UTF-8 text (byte 0xe9 at offset 9)"


def test_a_bad_regex_in_ignore_names_the_recipe_and_pattern(tmp_path) -> None:
    path = _write(tmp_path, {**VALID, "ignore": ["lm_head", "re:mlp.(up|down"]})
    assert _error(path) == f"recipe {path}: ignore pattern 're:mlp.(up|down' is not a valid regular expression (missing ), unterminated subpattern at position 4)"


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("rtn", {"blocksize": 4}, "unknown rtn option(s) ['blocksize'] (known: ['clip_grid', 'clip_min_ratio', 'clip_search'])"),
        ("gptq", {"blocksize": 0}, "gptq option blocksize must be an integer >= 1, got 0"),
        ("gptq", {"blocksize": "128"}, "gptq option blocksize must be an integer >= 1, got '128'"),
        ("gptq", {"percdamp": 0}, "gptq option percdamp must be a number in (0, 1], got 0"),
        ("gptq", {"actorder": "yes"}, "gptq option actorder must be true or false, got 'yes'"),
        ("gptq", {"act_order": True}, "unknown gptq option(s) ['act_order'] (known: ['actorder', 'blocksize', 'clip_grid', 'clip_min_ratio', 'clip_search', 'max_damp_tries', 'percdamp', 'static_groups', 'true_sequential'])"),
        ("llm_int8", {"threshold": -1}, "llm_int8 threshold must be a number > 0, got -1"),
        ("awq", {"grid": 0}, "awq option grid must be an integer >= 1, got 0"),
        ("awq", {"quantizer": "hqq"}, "awq quantizer must be 'rtn' or 'gptq', got 'hqq'"),
        ("awq", {"blocksize": 64}, "option(s) ['blocksize'] apply to quantizer: gptq only"),
    ],
)
def test_method_options_are_checked_when_the_recipe_loads(tmp_path, method, options, message) -> None:
    path = _write(tmp_path, {**VALID, "method": method, "options": options, **({"weights": {"bits": 8, "granularity": "channel"}} if method == "llm_int8" else {})})
    assert _error(path) == f"recipe {path}: {message}"


def test_smoothquant_options_are_checked_when_the_recipe_loads(tmp_path) -> None:
    base = load_recipe("w8a8-smoothquant-auto").model_dump(mode="json")
    path = _write(tmp_path, {**base, "options": {**base["options"], "search": "everywhere"}})
    assert _error(path) == f"recipe {path}: smoothquant search must be one of ('shared', 'per_fold'), got 'everywhere'"
    path = _write(tmp_path, {**base, "activations": None})
    assert _error(path) == f"recipe {path}: smoothquant prepares activations for quantization: add an `activations` scheme (W8A8)"


def test_inline_yaml_documents_get_the_same_limits() -> None:
    from quantmill.methods.recipe_files import yaml_documents

    assert yaml_documents("a: 1\n---\n- b\n", "recipe_yaml") == [{"a": 1}, ["b"]]
    with pytest.raises(RecipeError) as err:
        yaml_documents("a: 1\n---\nb: &x [1]\nc: *x\n", "recipe_yaml")
    assert str(err.value) == "recipe_yaml: line 3: YAML anchor &x (anchors and aliases are not allowed in recipes)"
    with pytest.raises(RecipeError, match=r"^recipe_yaml: 70001 bytes, more than the 65536 allowed$"):
        yaml_documents("#" * 70001, "recipe_yaml")
