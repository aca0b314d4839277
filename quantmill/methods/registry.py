"""The method registry: recipe `method` name -> its function, its version and its load-time check.

Adding a method is one module in quantmill/methods/ plus one entry here; tasks and flows never
change. The registry sits on top of the method modules: they never import it.
"""

from __future__ import annotations

from collections.abc import Callable

from quantmill.core.errors import RecipeError
from quantmill.methods.awq import awq, check_awq
from quantmill.methods.base import MethodContext, MethodResult, check_ignore_patterns
from quantmill.methods.gptq import check_gptq, gptq
from quantmill.methods.llm_int8 import check_llm_int8, llm_int8
from quantmill.methods.recipe import Recipe
from quantmill.methods.rtn import check_rtn, rtn
from quantmill.methods.smoothquant import check_smoothquant, smoothquant


# Bump a method's version when its numbers for the same recipe change (a new search, a fixed bug):
# its quantize entries stop matching and are recomputed; other methods' entries stay valid.
# Version 2 of rtn, gptq, awq and smoothquant (issue 21): symmetric weights below 8 bits use all
# 2^bits levels (scale absmax / ((qmax - qmin) / 2)), which changes every such weight they write.
# llm_int8 writes 8-bit weights only, which keep absmax / 127: its entries stay valid.
METHOD_VERSIONS: dict[str, int] = {
    "rtn": 2,
    "gptq": 2,
    "llm_int8": 1,
    "awq": 2,
    "smoothquant": 2,
}

METHODS: dict[str, Callable[[MethodContext], MethodResult]] = {
    "rtn": rtn,
    "gptq": gptq,
    "llm_int8": llm_int8,
    "awq": awq,
    "smoothquant": smoothquant,
}


# Everything about a recipe that can be checked without a model runs when the recipe is loaded,
# so a typo fails in milliseconds instead of after the calibration and stats stages.
METHOD_CHECKS: dict[str, Callable[[Recipe], None]] = {
    "rtn": check_rtn,
    "gptq": check_gptq,
    "llm_int8": check_llm_int8,
    "awq": check_awq,
    "smoothquant": check_smoothquant,
}


def check_recipe(recipe: Recipe) -> None:
    """The load-time checks of a recipe: its ignore patterns compile, its method's options are
    known and in range. Messages name the option; the caller prefixes the recipe's file."""
    check_ignore_patterns(recipe.ignore)
    try:
        METHOD_CHECKS.get(recipe.method, lambda r: None)(recipe)
    except RecipeError as err:  # the methods' own checks say "recipe NAME: ..."; the caller names the file
        raise RecipeError(str(err).removeprefix(f"recipe {recipe.name}: ")) from None
