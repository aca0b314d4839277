"""The method registry: recipe `method` name -> one entry holding everything about the method.

Adding a method is one module in quantmill/methods/ plus one entry in REGISTRY; tasks, flows and
the checkpoint writers never change (the writer is picked by the entry's `checkpoint_format`).
The registry sits on top of the method modules: they never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from quantmill.core.errors import RecipeError
from quantmill.methods.awq import awq, check_awq
from quantmill.methods.base import COMPRESSED_TENSORS, MethodContext, MethodResult, check_ignore_patterns
from quantmill.methods.gptq import check_gptq, gptq
from quantmill.methods.llm_int8 import CHECKPOINT_FORMAT as LLM_INT8_FORMAT
from quantmill.methods.llm_int8 import check_llm_int8, llm_int8
from quantmill.methods.recipe import Recipe
from quantmill.methods.rtn import check_rtn, rtn
from quantmill.methods.smoothquant import check_smoothquant, smoothquant


@dataclass(frozen=True)
class Method:
    """One method: what runs, which version of its numbers, how a recipe is checked at load time,
    how its options are typed (None: still a checked dict) and which checkpoint format it writes."""

    run: Callable[[MethodContext], MethodResult]
    version: int
    check: Callable[[Recipe], None]
    checkpoint_format: str
    options: type[BaseModel] | None = None


# Bump a method's version when its numbers for the same recipe change (a new search, a fixed bug):
# its quantize entries stop matching and are recomputed; other methods' entries stay valid.
# Version 2 of rtn, gptq, awq and smoothquant (issue 21): symmetric weights below 8 bits use all
# 2^bits levels (scale absmax / ((qmax - qmin) / 2)), which changes every such weight they write.
# llm_int8 writes 8-bit weights only, which keep absmax / 127: its entries stay valid.
REGISTRY: dict[str, Method] = {
    "rtn": Method(rtn, 2, check_rtn, COMPRESSED_TENSORS),
    "gptq": Method(gptq, 2, check_gptq, COMPRESSED_TENSORS),
    "llm_int8": Method(llm_int8, 1, check_llm_int8, LLM_INT8_FORMAT),
    "awq": Method(awq, 2, check_awq, COMPRESSED_TENSORS),
    "smoothquant": Method(smoothquant, 2, check_smoothquant, COMPRESSED_TENSORS),
}


def check_recipe(recipe: Recipe) -> None:
    """The load-time checks of a recipe: its ignore patterns compile, its method's options are
    known and in range. Everything that can be checked without a model runs when the recipe is
    loaded, so a typo fails in milliseconds instead of after the calibration and stats stages.
    Messages name the option; the caller prefixes the recipe's file."""
    check_ignore_patterns(recipe.ignore)
    method = REGISTRY.get(recipe.method)
    try:
        if method is not None:
            method.check(recipe)
    except RecipeError as err:  # the methods' own checks say "recipe NAME: ..."; the caller names the file
        raise RecipeError(str(err).removeprefix(f"recipe {recipe.name}: ")) from None
