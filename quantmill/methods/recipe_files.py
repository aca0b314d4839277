"""Recipe files: YAML text -> a validated `Recipe`, and the built-in recipes folder.

Apart from the models (recipe.py) because loading also runs the method registry's checks
(unknown method, option types), and the registry imports the models: kept in two modules, the
imports point one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from quantmill.core.errors import RecipeError
from quantmill.methods.recipe import Recipe
from quantmill.methods.registry import REGISTRY, check_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


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
    if recipe.method not in REGISTRY:
        raise RecipeError(f"recipe {origin}: unknown method {recipe.method!r} (known: {', '.join(sorted(REGISTRY))})")
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
