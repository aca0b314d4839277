"""GPTQ over a whole model: the sequential engine feeds each block's Linear inputs into Hessians,
the solver in quantmill/solvers/gptq.py quantizes each Linear, and the quantized block produces
the next block's inputs (so the error of earlier blocks is seen by later ones, as in the paper).

Linears that read the same tensor (q/k/v; gate/up) share one Hessian. With `true_sequential`
the groups of a block are quantized in forward order, each seeing the already-quantized ones.
Per-block results go to the engine's partial folder, so a killed run resumes at the next block
and ends bit-identical to an uninterrupted one.

The walk is the per-block driver's (quantmill/methods/driver.py) and the per-block step is
quantmill/methods/block_quant.py; this module holds what is GPTQ's: its options, the solver as a
per-Linear quantizer (which AWQ and SmoothQuant use with `quantizer: gptq`) and the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from pydantic import Field

from quantmill.core.errors import RecipeError
from quantmill.core.qparams import QuantizedWeight
from quantmill.methods.base import MethodContext, MethodResult
from quantmill.methods.block_quant import WeightQuantizer
from quantmill.methods.driver import BlockMethod, run_blocks
from quantmill.methods.options import ClipOptions, MethodOptions, options_of, parse_options
from quantmill.methods.recipe import Recipe
from quantmill.solvers.gptq import GPTQOptions, gptq_quantize


class GptqMethodOptions(ClipOptions):
    """The gptq method's options (the solver's per-Linear GPTQOptions are built from these and
    the recipe's weight scheme); AWQ and SmoothQuant with `quantizer: gptq` take the same keys."""

    method = "gptq"
    blocksize: int = Field(128, ge=1, strict=True, description="an integer >= 1")
    percdamp: float = Field(0.01, gt=0, le=1, strict=True, description="a number in (0, 1]")
    actorder: bool = Field(False, strict=True, description="true or false")
    static_groups: bool = Field(False, strict=True, description="true or false")
    true_sequential: bool = Field(False, strict=True, description="true or false")
    max_damp_tries: int = Field(5, ge=1, strict=True, description="an integer >= 1")


def gptq_options(recipe: Recipe, options: GptqMethodOptions, plan: dict[str, Any]) -> Callable[[str], GPTQOptions]:
    """The solver options of each module: the recipe's weight scheme, the module's granularity."""

    def options_for(full: str) -> GPTQOptions:
        granularity, group_size = plan[full]
        return GPTQOptions(
            bits=recipe.weights.bits,
            symmetric=recipe.weights.symmetric,
            group_size=group_size if granularity == "group" else None,
            actorder=options.actorder,
            static_groups=options.static_groups,
            blocksize=options.blocksize,
            percdamp=options.percdamp,
            max_damp_tries=options.max_damp_tries,
            weight_type="fp8" if recipe.weights.type == "float" else "int",
            clip=options.search(),
        )

    return options_for


def gptq_quantizer(options_for: Callable[[str], GPTQOptions]) -> WeightQuantizer:
    """The GPTQ solver as a per-Linear quantizer for `quantize_block`."""

    def quantize_one(full: str, W: torch.Tensor, H: torch.Tensor) -> tuple[QuantizedWeight, dict[str, Any]]:
        result = gptq_quantize(W, H, options_for(full))
        return result.weight, {
            "gptq_loss": result.loss, "damp": result.damp,
            "fallback_rtn": result.fallback_rtn, "dead_columns": result.dead_columns,
        }

    return quantize_one


def gptq(ctx: MethodContext) -> MethodResult:
    """GPTQ (Frantar et al. 2022) on every targeted decoder Linear: int or fp8 weights; the
    recipe's activation scheme, if any, is applied at run time as for the rtn method (static
    input scales from the stats stage's float statistics, as rtn)."""
    recipe = ctx.recipe
    options = options_of(recipe, GptqMethodOptions)
    quantizer = lambda plan: gptq_quantizer(gptq_options(recipe, options, plan))  # noqa: E731
    return run_blocks(ctx, BlockMethod("gptq", quantizer, true_sequential=options.true_sequential)).result


class QuantizerOptions(MethodOptions):
    """What AWQ and SmoothQuant share: `quantizer`, how the (scaled) weights are quantized (rtn or
    gptq), and with gptq the GPTQ options. A recipe writes those flat beside the method's own
    (its hash is the dict as written); the model holds them nested, as `gptq`."""

    quantizer: Literal["rtn", "gptq"] = "rtn"
    gptq: GptqMethodOptions | None = None

    @classmethod
    def known(cls) -> set[str]:
        """GPTQ's options flat (a recipe file), or nested as `gptq` (the typed form)."""
        return set(cls.model_fields) | set(GptqMethodOptions.model_fields)

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        quantizer = data.get("quantizer", "rtn")
        if quantizer not in ("rtn", "gptq"):
            raise ValueError(f"{cls.method} quantizer must be 'rtn' or 'gptq', got {quantizer!r}")
        nested = data.get("gptq") or {}
        nested = nested.written() if isinstance(nested, GptqMethodOptions) else nested
        if not isinstance(nested, dict):
            raise ValueError(f"{cls.method} option gptq must be a mapping of GPTQ options, got {nested!r}")
        own = {k: v for k, v in data.items() if k not in GptqMethodOptions.model_fields and k != "gptq"}
        flat = {**nested, **{k: v for k, v in data.items() if k in GptqMethodOptions.model_fields}}
        if flat and quantizer != "gptq":
            raise ValueError(f"option(s) {sorted(flat)} apply to quantizer: gptq only")
        return {**own, "gptq": parse_options(flat, GptqMethodOptions)} if quantizer == "gptq" else own

    def written(self) -> dict[str, Any]:
        """As a recipe file writes them: GPTQ's options flat beside `quantizer`."""
        own = self.model_dump(mode="json", exclude_defaults=True, exclude={"gptq"})
        return {**own, **(self.gptq.written() if self.gptq is not None else {})}

    def weight_quantizer(self, recipe: Recipe, plan: dict[str, tuple[str, int | None]]) -> WeightQuantizer | None:
        """GPTQ with these options as a per-Linear quantizer for quantize_block; None for rtn."""
        return gptq_quantizer(gptq_options(recipe, self.gptq, plan)) if self.gptq is not None else None

    @property
    def true_sequential(self) -> bool:
        return self.gptq is not None and self.gptq.true_sequential


def check_gptq(recipe: Recipe) -> None:
    """Load-time checks beyond the options model: the clipping search is for integer weights."""
    if options_of(recipe, GptqMethodOptions).clip_search and recipe.weights.type != "int":
        raise RecipeError("gptq option clip_search is for integer weights (weights: type int)")
