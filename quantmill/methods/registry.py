"""The method registry: recipe `method` name -> one entry holding everything about the method.

Adding a method is one module in quantmill/methods/ plus one entry in REGISTRY; tasks, flows and
the checkpoint writers never change (the writer is picked by the entry's `checkpoint_format`).
The registry sits on top of the method modules: they never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quantmill.core.errors import RecipeError
from quantmill.methods.awq import AwqOptions, awq, check_awq
from quantmill.methods.base import COMPRESSED_TENSORS, MethodContext, MethodResult, check_ignore_patterns
from quantmill.methods.gptq import GptqMethodOptions, check_gptq, gptq
from quantmill.methods.llm_int8 import CHECKPOINT_FORMAT as LLM_INT8_FORMAT
from quantmill.methods.llm_int8 import LlmInt8Options, check_llm_int8, llm_int8
from quantmill.methods.options import MethodOptions, options_of
from quantmill.methods.recipe import Recipe
from quantmill.methods.rtn import RtnOptions, check_rtn, rtn
from quantmill.methods.rtn_lsq import RtnLsqOptions, check_rtn_lsq, rtn_lsq
from quantmill.methods.smoothquant import SmoothQuantOptions, check_smoothquant, smoothquant


@dataclass(frozen=True)
class Method:
    """One method: what runs, which version of its numbers, how a recipe is checked at load time
    (beyond its options), which checkpoint format it writes and the model of its options."""

    run: Callable[[MethodContext], MethodResult]
    version: int
    check: Callable[[Recipe], None]
    checkpoint_format: str
    options: type[MethodOptions]


# Bump a method's version when its numbers for the same recipe change (a new search, a fixed bug):
# its quantize entries stop matching and are recomputed; other methods' entries stay valid.
# Version 2 of rtn, gptq, awq and smoothquant (issue 21): symmetric weights below 8 bits use all
# 2^bits levels (scale absmax / ((qmax - qmin) / 2)), which changes every such weight they write.
# llm_int8 writes 8-bit weights only, which keep absmax / 127: its entries stay valid.
REGISTRY: dict[str, Method] = {
    "rtn": Method(rtn, 2, check_rtn, COMPRESSED_TENSORS, RtnOptions),
    "gptq": Method(gptq, 2, check_gptq, COMPRESSED_TENSORS, GptqMethodOptions),
    "llm_int8": Method(llm_int8, 1, check_llm_int8, LLM_INT8_FORMAT, LlmInt8Options),
    "awq": Method(awq, 2, check_awq, COMPRESSED_TENSORS, AwqOptions),
    "smoothquant": Method(smoothquant, 2, check_smoothquant, COMPRESSED_TENSORS, SmoothQuantOptions),
    "rtn_lsq": Method(rtn_lsq, 1, check_rtn_lsq, COMPRESSED_TENSORS, RtnLsqOptions),
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
            options_of(recipe, method.options)  # a bad or unknown option, named
            method.check(recipe)
    except RecipeError as err:  # the methods' own checks say "recipe NAME: ..."; the caller names the file
        raise RecipeError(str(err).removeprefix(f"recipe {recipe.name}: ")) from None
