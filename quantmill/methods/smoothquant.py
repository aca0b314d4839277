"""SmoothQuant (Xiao et al. 2023) as a recipe method: per decoder block, fold SmoothQuant scales
(alpha fixed, or searched per block on the calibration inputs), then record the smoothed block's
input statistics; finally the recipe's W8A8 scheme is applied as the `rtn` method does (static
input scales from the recipe's observer over the smoothed statistics). Smoothing is exact, so the
block inputs of the walk are those of the float model, and the stats stage's absmax is valid for
every block. With `quantizer: gptq` each smoothed block is quantized inside the walk instead. The
walk is the per-block driver's (quantmill/methods/driver.py); the folds and the alpha search are
quantmill/solvers/smoothquant.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, ValidationInfo, field_validator, model_validator

from quantmill.core.errors import RecipeError, StatsError
from quantmill.methods.base import MethodContext, MethodResult, search_batches
from quantmill.methods.driver import BlockMethod, Prepared, run_blocks
from quantmill.methods.gptq import QuantizerOptions
from quantmill.methods.options import options_of
from quantmill.methods.recipe import Recipe
from quantmill.model.arch import block_folds, layout_of
from quantmill.model.sequential import BlockInputs
from quantmill.solvers.folds import BlockNames
from quantmill.solvers.smoothquant import (
    ALPHA_GRID,
    SEARCH_ERRORS,
    _lookup,
    alpha_errors,
    alpha_for,
    apply_fake_w8a8,
    best_alpha,
    fold_names,
    fold_smoothing_linear,
    get_submodule,
    search_fold_alphas,
    smooth_decoder_layer,
    smoothing_scales,
    validate_alpha,
)


SEARCHES = ("shared", "per_fold")


def _alpha(value: Any) -> float:
    try:
        return validate_alpha(value)
    except RecipeError as err:
        raise ValueError(str(err)) from None


class SmoothQuantOptions(QuantizerOptions):
    """smoothquant's options, beside `quantizer` (rtn | gptq, gptq with the GPTQ options); see
    `smoothquant` for what each does."""

    method = "smoothquant"
    alpha: float | Literal["auto"] = 0.5
    grid: tuple[float, ...] = ALPHA_GRID
    search: str = "shared"
    search_samples: int = Field(8, ge=1, strict=True, description="an integer >= 1")
    search_error: str = "mse"
    v_o: bool = Field(True, strict=True, description="true or false")
    up_down: bool = Field(True, strict=True, description="true or false")

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_or_auto(cls, value: Any) -> float | str:
        if value == "auto":
            return value
        try:
            return _alpha(value)
        except ValueError as err:
            raise ValueError(f"{err} (or 'auto')") from None

    @field_validator("grid", mode="before")
    @classmethod
    def _alphas(cls, value: Any) -> tuple[float, ...]:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"smoothquant option grid must be a non-empty list of alphas in [0, 1], got {value!r}")
        return tuple(_alpha(a) for a in value)

    @field_validator("search", "search_error", mode="before")
    @classmethod
    def _one_of_known(cls, value: Any, info: ValidationInfo) -> str:
        known = {"search": SEARCHES, "search_error": SEARCH_ERRORS}[info.field_name]
        if value not in known:
            raise ValueError(f"smoothquant {info.field_name} must be one of {known}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _per_fold_needs_auto(self) -> "SmoothQuantOptions":
        if self.search != "shared" and self.alpha != "auto":
            raise ValueError(f"smoothquant search {self.search!r} needs alpha: auto")
        return self


def smooth_layer(
    layer: nn.Module,
    names: BlockNames,
    act_absmax: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    prefix: str = "",
    v_o: bool = True,
    up_down: bool = True,
) -> dict[str, torch.Tensor]:
    """`smooth_decoder_layer` (norm -> q/k/v, norm -> gate/up, v -> o) plus, with `up_down`, the
    down_proj input through up_proj's rows (the `linear` folds of `names`, the architecture
    table's row): down_proj reads act(gate) * up, linear in each up channel, so dividing up row j
    by s_j divides down_proj input channel j by s_j exactly. That input carries the largest
    activations of Llama-family models. alpha: one number, or one per fold
    (`quantmill.solvers.smoothquant.fold_names`). Returns s per fold."""

    linear_folds = []
    if up_down:  # resolve before any fold, so a refused layer is left untouched
        if not names.folds_of("linear"):
            raise RecipeError(f"{prefix or 'decoder layer'}: no up -> down fold in the architecture table for this block")
        for fold in names.folds_of("linear"):
            up, down = get_submodule(layer, fold.producer, prefix), get_submodule(layer, fold.consumers[0], prefix)
            if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
                raise RecipeError(f"{prefix}.{fold.producer}: cannot fold smoothing (not a Linear)")
            linear_folds.append((fold.producer, up, down, _lookup(act_absmax, fold.consumers[0], prefix), alpha_for(alpha, fold.producer)))
    scales = smooth_decoder_layer(layer, names, act_absmax, alpha, prefix, v_o=v_o)
    for producer, up, down, down_absmax, up_alpha in linear_folds:
        s = smoothing_scales(down_absmax, down.weight.detach().float().abs().amax(dim=0), up_alpha)
        fold_smoothing_linear(up, [down], s, name=f"{prefix}.{producer}" if prefix else producer)
        scales[producer] = s
    return scales


def fold_of(module: str, names: BlockNames) -> str:
    """The fold that smooths a decoder-layer Linear's input ("model.layers.3.self_attn.q_proj" ->
    "input_layernorm"), read off the folds of the architecture table's row."""

    return next(fold for c, fold in names.producer_of().items() if module == c or module.endswith("." + c))


def block_act_absmax(stats: Mapping[str, Any], block_prefix: str) -> dict[str, torch.Tensor]:
    """max|X_j| of the Linear inputs of one block ("model.layers.3"), keyed relative to the block."""
    return {name[len(block_prefix) + 1 :]: s.absmax for name, s in stats.items() if name.startswith(block_prefix + ".")}


def _fake_w8a8(recipe: Recipe):
    """The recipe's W8A8 in float, for the alpha search: per-channel int8 weights; inputs per token
    (dynamic recipes) or per tensor at the batch's own range (static: a min-max calibration on the
    search batch; the recipe's observer is applied to the final statistics only), symmetric or
    with a zero point as the recipe's inputs."""

    granularity = "token" if recipe.activations.dynamic else "tensor"
    symmetric = recipe.activations.symmetric
    return lambda module: apply_fake_w8a8(module, granularity, symmetric=symmetric)


def smoothquant(ctx: MethodContext) -> MethodResult:
    """SmoothQuant (Xiao et al. 2023), then the recipe's W8A8 scheme (as the `rtn` method).

    Options: alpha (in [0, 1], or "auto"), grid (the alphas tried by "auto", 0.0 to 1.0 by 0.05),
    search ("shared": one alpha per block, the default; "per_fold": one per fold, by coordinate
    descent from the best shared one, `quantmill.solvers.smoothquant.search_fold_alphas`), search_samples
    (calibration samples of the search, 8; whole batches of 8), search_error (what the search
    minimises: mse, the default, or token_relative; see quantmill.solvers.smoothquant.output_error), v_o
    (smooth o_proj's input through v_proj, true), up_down (smooth down_proj's input through up_proj,
    true), quantizer (how the smoothed weights are quantized: rtn, the default, or gptq, which
    also takes GPTQ's options: SmoothQuant moves activation range into the weights, and GPTQ
    takes back much of the weight error that adds). The static input ranges come from the
    smoothed model's own statistics, recorded during the walk, so every observer sees the
    activations it will quantize.
    """

    recipe = ctx.recipe
    options = options_of(recipe, SmoothQuantOptions)
    try:
        check_scheme(recipe, options)
    except RecipeError as err:
        raise RecipeError(f"recipe {recipe.name}: {err}") from None
    alpha, grid, samples, search, search_error = options.alpha, list(options.grid), options.search_samples, options.search, options.search_error
    v_o, up_down, quantizer = options.v_o, options.up_down, options.quantizer
    arch_names = block_folds(ctx.model, "smoothquant")
    prefix = layout_of(ctx.model).layers
    quantize_fn = _fake_w8a8(recipe)

    def prepare(index: int, block: nn.Module, inputs: BlockInputs) -> Prepared:
        """Fold the block's smoothing scales, alpha fixed or searched on its inputs."""
        p = f"{prefix}.{index}"
        absmax = block_act_absmax(ctx.stats, p)
        if not absmax:
            raise StatsError(f"recipe {recipe.name}: smoothquant needs the input absmax of {p}'s Linears; the stats stage has none")
        meta: dict[str, Any] = {}
        a = alpha
        if alpha == "auto":
            batches, kwargs = search_batches(inputs, samples)
            fold = lambda trial, a_: smooth_layer(trial, arch_names, absmax, a_, p, v_o, up_down)  # noqa: E731
            if search == "per_fold":
                a, info = search_fold_alphas(block, batches, kwargs, fold_names(arch_names, v_o, up_down), quantize_fn, fold, grid, search_error)
                errors = info["shared"]
                meta.update({"search_error": info["error"], "shared_search_error": info["shared_error"]})
            else:
                with torch.no_grad():
                    errors = alpha_errors(block, batches, kwargs, absmax, quantize_fn, grid, p, search_error, smooth=fold)
                a = best_alpha(errors)
            meta["alpha_errors"] = {str(k): v for k, v in errors.items()}
        scales = smooth_layer(block, arch_names, absmax, a, p, v_o, up_down)
        meta.update({"alpha": a, "scale_max": {k: float(v.max()) for k, v in scales.items()}, "scale_min": {k: float(v.min()) for k, v in scales.items()}})
        return Prepared(meta)

    # GPTQ quantizes each smoothed block inside the walk; RTN rounds the smoothed model after it.
    # The static input scales come from the smoothed blocks' own statistics, recorded in the walk.
    gptq_in_walk = (lambda plan: options.weight_quantizer(recipe, plan)) if options.gptq is not None else None
    run = run_blocks(ctx, BlockMethod("smoothquant", gptq_in_walk, prepare, options.true_sequential, record_stats=True, weights_key="gptq."))
    result, smoothed_stats = run.result, run.stats
    alphas = [meta["alpha"] for meta in run.metas]
    for row in result.report:
        index = int(row["module"][len(prefix) + 1 :].split(".", 1)[0])
        row["block"] = index
        a = alphas[index]
        row["alpha"] = a[fold_of(row["module"], arch_names)] if isinstance(a, dict) else a
        row.setdefault("act_absmax", float(smoothed_stats[row["module"]].absmax.max()))
        before = ctx.stats.get(row["module"])
        if before is not None:
            row["act_absmax_before"] = float(before.absmax.max())
    result.notes.update({"smoothquant_quantizer": quantizer, "smoothquant_alpha": alpha, "smoothquant_search": search if alpha == "auto" else None, "smoothquant_alphas": alphas})
    return result


def check_scheme(recipe: Recipe, options: SmoothQuantOptions) -> None:
    """What the options model cannot see: an activations scheme, integer weights for gptq."""
    if recipe.activations is None:
        raise RecipeError("smoothquant prepares activations for quantization: add an `activations` scheme (W8A8)")
    if options.quantizer == "gptq" and recipe.weights.type != "int":
        raise RecipeError("smoothquant quantizer gptq needs integer weights (weights: type int)")


def check_smoothquant(recipe: Recipe) -> None:
    """Load-time checks: the options model, then the recipe's schemes."""
    check_scheme(recipe, options_of(recipe, SmoothQuantOptions))
