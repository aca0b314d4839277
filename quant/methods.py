"""The method registry: recipe `method` name -> function(context) -> integer weights + report.

Adding a method is one module in quant/ plus one entry in METHODS; flows and tasks never change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from quant.arch import decoder_layers, layout_of
from quant.errors import RecipeError
from quant.observers import ActivationStats
from quant.qparams import QuantizedWeight, quantize_weight_rtn
from quant.recipe import Recipe
from quant.schemes import quantize_weight_fp8, static_input_qparams


@dataclass
class MethodContext:
    """Everything a method may read; the model is float, on the CPU, and may be modified."""

    model: nn.Module
    recipe: Recipe
    stats: dict[str, ActivationStats]
    calibration: torch.Tensor
    device: torch.device
    partial_dir: Path | None = None
    on_block_done: Callable[[int, int, dict[str, Any]], None] | None = None


@dataclass
class MethodResult:
    weights: dict[str, QuantizedWeight]
    report: list[dict[str, Any]]
    notes: dict[str, Any] = field(default_factory=dict)
    # Static activations only: module name -> (input_scale, input_zero_point), scalars.
    input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """compressed-tensors' convention: exact/suffix names, or `re:REGEX`."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def target_linears(model: nn.Module, recipe: Recipe) -> dict[str, nn.Linear]:
    """The decoder-block Linears the recipe quantizes, by full module name, in block order."""
    prefix = layout_of(model).layers
    targets = {}
    for i, block in enumerate(decoder_layers(model)):
        for name, module in block.named_modules():
            full = f"{prefix}.{i}.{name}"
            if isinstance(module, nn.Linear) and not is_ignored(full, recipe.ignore):
                targets[full] = module
    return targets


def layer_granularity(recipe: Recipe, linears: dict[str, nn.Linear]) -> dict[str, tuple[str, int | None]]:
    """(granularity, group size) per module; an indivisible group size is an error naming the layers
    unless the recipe keeps those layers per-channel (`indivisible: channel`)."""
    w = recipe.weights
    plan: dict[str, tuple[str, int | None]] = {}
    bad = []
    for name, linear in linears.items():
        if w.granularity == "group" and linear.in_features % w.group_size:
            if w.indivisible == "channel":
                plan[name] = ("channel", None)
                continue
            bad.append(f"{name} ({linear.in_features})")
        plan[name] = (w.granularity, w.group_size)
    if bad:
        raise RecipeError(
            f"recipe {recipe.name}: group size {w.group_size} does not divide the input width of "
            f"{len(bad)} layer(s): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} "
            f"(set weights.indivisible: channel to keep them per-channel)"
        )
    return plan


def weight_error_report(name: str, w: torch.Tensor, qw: QuantizedWeight, stats: ActivationStats | None, **extra: Any) -> dict[str, Any]:
    """Relative weight error, and the output error it implies for the calibration inputs
    (E||X(W-Q)^T||^2 / E||XW^T||^2 with channels taken as uncorrelated: weights by mean x_j^2)."""
    w = w.float()
    diff = qw.dequantize() - w
    row = {"module": name, "shape": list(w.shape), "rel_weight_error": (diff.norm() / w.norm().clamp_min(1e-12)).item(), **extra}
    if stats is not None:
        ms = stats.mean_sq.to(w.device)
        row["rel_output_error"] = ((diff.square() @ ms).sum() / (w.square() @ ms).sum().clamp_min(1e-12)).sqrt().item()
    return row


def rtn(ctx: MethodContext) -> MethodResult:
    """Round-to-nearest: each weight to the nearest point of its grid (int, or fp8 e4m3 for
    `weights.type: float`); with static `activations`, input scales from the stats' observer range."""
    linears = target_linears(ctx.model, ctx.recipe)
    plan = layer_granularity(ctx.recipe, linears)
    w = ctx.recipe.weights
    input_qparams, act_rows = static_input_qparams(ctx.recipe, ctx.stats, list(linears))
    weights, report = {}, []
    for name, linear in linears.items():
        granularity, group_size = plan[name]
        if w.type == "float":
            qw = quantize_weight_fp8(linear.weight.data, granularity)
        else:
            qw = quantize_weight_rtn(linear.weight.data, w.bits, w.symmetric, granularity, group_size)
        weights[name] = qw
        report.append(weight_error_report(name, linear.weight.data, qw, ctx.stats.get(name), granularity=granularity, **act_rows.get(name, {})))
    return MethodResult(weights, report, input_qparams=input_qparams)


def _gptq(ctx: MethodContext) -> MethodResult:
    from quant.gptq_walk import gptq  # gptq_walk imports this module: resolve at call time

    return gptq(ctx)


def _outlier_method(name: str) -> Callable[[MethodContext], MethodResult]:
    """llm_int8, awq, smoothquant: quant/outlier_methods.py imports this module, so resolve late."""

    def run(ctx: MethodContext) -> MethodResult:
        from quant import outlier_methods

        return getattr(outlier_methods, name)(ctx)

    run.__name__ = name
    return run


# Bump a method's version when its numbers for the same recipe change (a new search, a fixed bug):
# its quantize entries stop matching and are recomputed; other methods' entries stay valid.
METHOD_VERSIONS: dict[str, int] = {
    "rtn": 1,
    "gptq": 1,
    "llm_int8": 1,
    "awq": 1,
    "smoothquant": 1,
}

METHODS: dict[str, Callable[[MethodContext], MethodResult]] = {
    "rtn": rtn,
    "gptq": _gptq,
    "llm_int8": _outlier_method("llm_int8"),
    "awq": _outlier_method("awq"),
    "smoothquant": _outlier_method("smoothquant"),
}
