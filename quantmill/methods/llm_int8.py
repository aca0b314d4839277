"""LLM.int8() (Dettmers et al. 2022) as a recipe method: int8 weights per output row; the outlier
decomposition runs at inference in `LLMInt8Linear` (quantmill/nn/llm_int8.py), and the checkpoint
is quantmill's own format (quantmill/io/llm_int8_checkpoint.py).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from pydantic import field_validator

from quantmill.core.errors import RecipeError
from quantmill.core.grid import IntGrid
from quantmill.core.qparams import QuantizedWeight, quantize_weight_rtn
from quantmill.methods.base import MethodContext, MethodResult, target_linears, weight_error_report
from quantmill.methods.options import MethodOptions, options_of
from quantmill.methods.recipe import Recipe
from quantmill.nn.llm_int8 import DEFAULT_THRESHOLD, LLMInt8Linear, inputs_label, validate_threshold

CHECKPOINT_FORMAT = "quantmill-llm-int8"  # compressed-tensors has none for the outlier split


class LlmInt8Options(MethodOptions):
    """threshold: an input column whose max|x| reaches it goes through the float path (inf: none
    does). zero_point: quantize the int8 part's inputs per token with a zero point (the paper's
    zeropoint vector-wise quantization) instead of absmax (bitsandbytes')."""

    method = "llm_int8"
    threshold: float = DEFAULT_THRESHOLD
    zero_point: bool = False

    @field_validator("threshold", mode="before")
    @classmethod
    def _positive(cls, value: Any) -> float:
        try:
            return validate_threshold(value)
        except RecipeError as err:
            raise ValueError(str(err)) from None

    @field_validator("zero_point", mode="before")
    @classmethod
    def _a_bool(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"llm_int8 zero_point must be true or false, got {value!r}")
        return value


def llm_int8_threshold(recipe: Recipe) -> float:
    return options_of(recipe, LlmInt8Options).threshold


def llm_int8_zero_point(recipe: Recipe) -> bool:
    return options_of(recipe, LlmInt8Options).zero_point


def llm_int8(ctx: MethodContext) -> MethodResult:
    """LLM.int8() (Dettmers et al. 2022): int8 weights per output row; the outlier decomposition
    runs at inference. The report adds, per module, the input channels whose calibration max|x|
    reaches the threshold (the columns the float path would take for an input like the whole
    calibration set)."""

    recipe = ctx.recipe
    options = options_of(recipe, LlmInt8Options)
    threshold, zero_point = options.threshold, options.zero_point
    w = recipe.weights
    if (w.type, w.bits, w.symmetric, w.granularity) != ("int", 8, True, "channel"):
        raise RecipeError(f"recipe {recipe.name}: llm_int8 stores symmetric int8 weights per output channel (weights: bits 8, symmetric, granularity channel)")
    if recipe.activations is not None:
        raise RecipeError(f"recipe {recipe.name}: llm_int8 quantizes its inputs itself (int8 per token, outlier columns in float): remove `activations`")
    weights: dict[str, QuantizedWeight] = {}
    report: list[dict[str, Any]] = []
    for name, linear in target_linears(ctx.model, recipe).items():
        qw = quantize_weight_rtn(linear.weight.data, IntGrid.for_weights(8, True), "channel")
        weights[name] = qw
        extra: dict[str, Any] = {}
        s = ctx.stats.get(name)
        if s is not None:
            cols = s.absmax >= threshold
            extra = {"calib_outlier_columns": int(cols.sum()), "calib_outlier_fraction": float(cols.float().mean())}
        report.append(weight_error_report(name, linear.weight.data, qw, s, **extra))
    return MethodResult(weights, report, {"llm_int8_threshold": threshold, "llm_int8_inputs": inputs_label(zero_point)})


def llm_int8_outlier_fractions(model: nn.Module) -> dict[str, float]:
    """Per LLMInt8Linear: the mean share of its input columns taken out (sent through the float
    path) over every forward since it was built or reset. Empty for a model without them."""

    return {name: m.mean_outlier_fraction for name, m in model.named_modules() if isinstance(m, LLMInt8Linear)}


def check_llm_int8(recipe: Recipe) -> None:
    """Load-time checks: the options model (a known key, a valid threshold, a bool zero_point)."""
    options_of(recipe, LlmInt8Options)
