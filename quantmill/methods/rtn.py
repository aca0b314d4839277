"""Round-to-nearest: each weight to the nearest point of its grid, optionally with a searched
clipping ratio; also the RTN weight quantizer that AWQ and SmoothQuant use per block.
"""

from __future__ import annotations

from typing import Any

import torch

from quantmill.core.errors import RecipeError
from quantmill.core.grid import weight_grid
from quantmill.core.qparams import QuantizedWeight, quantize_weight_rtn
from quantmill.methods.base import MethodContext, MethodResult, layer_granularity, target_linears, weight_error_report
from quantmill.methods.options import ClipOptions, options_of
from quantmill.methods.recipe import Recipe
from quantmill.methods.schemes import static_input_qparams


class RtnOptions(ClipOptions):
    """rtn's options: only the optional clipping-ratio search."""

    method = "rtn"


def rtn(ctx: MethodContext) -> MethodResult:
    """Round-to-nearest: each weight to the nearest point of its grid (int, or fp8 e4m3 for
    `weights.type: float`); with static `activations`, input scales from the stats' observer range."""
    linears = target_linears(ctx.model, ctx.recipe)
    plan = layer_granularity(ctx.recipe, linears)
    w = ctx.recipe.weights
    input_qparams, act_rows = static_input_qparams(ctx.recipe, ctx.stats, list(linears))
    grid = weight_grid(w.type, w.bits, w.symmetric)
    clip = options_of(ctx.recipe, RtnOptions).search()
    weights, report = {}, []
    for name, linear in linears.items():
        granularity, group_size = plan[name]
        # The clip search (integer weights only, checked at load) weighs input j's error by its
        # mean square over the calibration inputs (the Hessian's diagonal, up to a constant),
        # unweighted without stats.
        stats = ctx.stats.get(name) if clip is not None else None
        importance = stats.mean_sq.to(linear.weight.device) if stats is not None else None
        qw = quantize_weight_rtn(linear.weight.data, grid, granularity, group_size, clip, importance)
        weights[name] = qw
        report.append(weight_error_report(name, linear.weight.data, qw, ctx.stats.get(name), granularity=granularity, **act_rows.get(name, {})))
    return MethodResult(weights, report, input_qparams=input_qparams)


def rtn_quantizer(plan: dict[str, tuple[str, int | None]], recipe: Recipe):
    w = recipe.weights
    grid = weight_grid(w.type, w.bits, w.symmetric)

    def quantize_one(full: str, W: torch.Tensor, H: torch.Tensor) -> tuple[QuantizedWeight, dict[str, Any]]:
        granularity, group_size = plan[full]
        return quantize_weight_rtn(W, grid, granularity, group_size), {}

    return quantize_one


def check_rtn(recipe: Recipe) -> None:
    """Load-time checks beyond the options model: the search is for integer weights."""
    if options_of(recipe, RtnOptions).clip_search and recipe.weights.type != "int":
        raise RecipeError("rtn option clip_search is for integer weights (weights: type int)")
