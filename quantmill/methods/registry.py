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
from quant.qparams import ClipSearch, QuantizedWeight, quantize_weight_rtn
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


RTN_OPTIONS = {"clip_search", "clip_grid", "clip_min_ratio"}


def rtn_clip_search(recipe: Recipe) -> ClipSearch | None:
    """rtn's optional clipping-ratio search (`clip_search: true`, `clip_grid`, `clip_min_ratio`)."""
    o = recipe.options
    if not o.get("clip_search", False):
        return None
    return ClipSearch(grid=int(o.get("clip_grid", 20)), min_ratio=float(o.get("clip_min_ratio", 0.8)))


def rtn(ctx: MethodContext) -> MethodResult:
    """Round-to-nearest: each weight to the nearest point of its grid (int, or fp8 e4m3 for
    `weights.type: float`); with static `activations`, input scales from the stats' observer range."""
    linears = target_linears(ctx.model, ctx.recipe)
    plan = layer_granularity(ctx.recipe, linears)
    w = ctx.recipe.weights
    input_qparams, act_rows = static_input_qparams(ctx.recipe, ctx.stats, list(linears))
    clip = rtn_clip_search(ctx.recipe)
    weights, report = {}, []
    for name, linear in linears.items():
        granularity, group_size = plan[name]
        if w.type == "float":
            qw = quantize_weight_fp8(linear.weight.data, granularity)
        else:
            # The clip search weighs input j's error by its mean square over the calibration
            # inputs (the Hessian's diagonal, up to a constant), unweighted without stats.
            stats = ctx.stats.get(name) if clip is not None else None
            importance = stats.mean_sq.to(linear.weight.device) if stats is not None else None
            qw = quantize_weight_rtn(linear.weight.data, w.bits, w.symmetric, granularity, group_size, clip, importance)
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
    "gptq": _gptq,
    "llm_int8": _outlier_method("llm_int8"),
    "awq": _outlier_method("awq"),
    "smoothquant": _outlier_method("smoothquant"),
}


# ----------------------------------------------------------------------------- load-time checks
# Everything about a recipe that can be checked without a model runs when the recipe is loaded,
# so a typo fails in milliseconds instead of after the calibration and stats stages.


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_ignore_patterns(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise RecipeError(f"ignore pattern {pattern!r} is not a valid regular expression ({err})") from None


def check_gptq_option_values(options: dict[str, Any]) -> None:
    """Types and ranges of GPTQ's options (the solver would fail or hang on them mid-walk)."""
    for name in ("blocksize", "max_damp_tries"):
        if name in options and (not _is_int(options[name]) or options[name] < 1):
            raise RecipeError(f"gptq option {name} must be an integer >= 1, got {options[name]!r}")
    if "percdamp" in options:
        value = options["percdamp"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise RecipeError(f"gptq option percdamp must be a number in (0, 1], got {value!r}")
    for name in ("actorder", "static_groups", "true_sequential"):
        if name in options and not isinstance(options[name], bool):
            raise RecipeError(f"gptq option {name} must be true or false, got {options[name]!r}")
    check_clip_option_values(options, "gptq")


def check_clip_option_values(options: dict[str, Any], method: str) -> None:
    """The clipping-ratio search: clip_search a bool; clip_grid an integer >= 1; clip_min_ratio a
    number in (0, 1); the last two only with clip_search: true."""
    if "clip_search" in options and not isinstance(options["clip_search"], bool):
        raise RecipeError(f"{method} option clip_search must be true or false, got {options['clip_search']!r}")
    if "clip_grid" in options and (not _is_int(options["clip_grid"]) or not 1 <= options["clip_grid"] <= 1000):
        raise RecipeError(f"{method} option clip_grid must be an integer in 1..1000, got {options['clip_grid']!r}")
    if "clip_min_ratio" in options:
        value = options["clip_min_ratio"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise RecipeError(f"{method} option clip_min_ratio must be a number in (0, 1), got {value!r}")
    tuning = {"clip_grid", "clip_min_ratio"} & set(options)
    if tuning and not options.get("clip_search", False):
        raise RecipeError(f"{method} option(s) {sorted(tuning)} need clip_search: true")


def _check_rtn(recipe: Recipe) -> None:
    unknown = set(recipe.options) - RTN_OPTIONS
    if unknown:
        raise RecipeError(f"unknown rtn option(s) {sorted(unknown)} (known: {sorted(RTN_OPTIONS)})")
    check_clip_option_values(recipe.options, "rtn")
    if recipe.options.get("clip_search") and recipe.weights.type != "int":
        raise RecipeError("rtn option clip_search is for integer weights (weights: type int)")


def _check_gptq(recipe: Recipe) -> None:
    from quant.gptq_walk import OPTION_KEYS

    unknown = set(recipe.options) - OPTION_KEYS
    if unknown:
        raise RecipeError(f"unknown gptq option(s) {sorted(unknown)} (known: {sorted(OPTION_KEYS)})")
    check_gptq_option_values(recipe.options)
    if recipe.options.get("clip_search") and recipe.weights.type != "int":
        raise RecipeError("gptq option clip_search is for integer weights (weights: type int)")


def _check_outlier_method(recipe: Recipe) -> None:
    """llm_int8 / awq / smoothquant: their own option checks (quant/outlier_methods.py), run early."""
    from quant import outlier_methods as om
    from quant.gptq_walk import OPTION_KEYS

    o = recipe.options
    if recipe.method == "llm_int8":
        om._check_options(recipe, om.LLM_INT8_OPTIONS)
        om.llm_int8_threshold(recipe)
        om.llm_int8_zero_point(recipe)
        return
    known = (om.AWQ_OPTIONS if recipe.method == "awq" else om.SMOOTHQUANT_OPTIONS) | OPTION_KEYS
    om._check_options(recipe, known)
    check_gptq_option_values(o)
    quantizer = om._quantizer_choice(recipe)
    for name in ("grid", "search_samples") if recipe.method == "awq" else ("search_samples",):
        if name in o and (not _is_int(o[name]) or o[name] < 1):
            raise RecipeError(f"{recipe.method} option {name} must be an integer >= 1, got {o[name]!r}")
    bools = ("clip",) if recipe.method == "awq" else ("v_o", "up_down")
    for name in bools:
        if name in o and not isinstance(o[name], bool):
            raise RecipeError(f"{recipe.method} option {name} must be true or false, got {o[name]!r}")
    w = recipe.weights
    if recipe.method == "awq":
        if w.type != "int" or w.granularity != "group":
            raise RecipeError("awq searches scales for integer group-wise weights (weights: type int, granularity group)")
        if recipe.activations is not None:
            raise RecipeError("awq is weight-only: remove `activations`")
        return
    from quant.smoothquant import SEARCH_ERRORS, validate_alpha

    alpha = om.smoothquant_alpha(recipe)
    if recipe.activations is None:
        raise RecipeError("smoothquant prepares activations for quantization: add an `activations` scheme (W8A8)")
    grid = o.get("grid", [])
    if not isinstance(grid, list) or not grid and "grid" in o:
        raise RecipeError(f"smoothquant option grid must be a non-empty list of alphas in [0, 1], got {grid!r}")
    for a in grid:
        validate_alpha(a)
    if o.get("search_error", "mse") not in SEARCH_ERRORS:
        raise RecipeError(f"smoothquant search_error must be one of {SEARCH_ERRORS}, got {o['search_error']!r}")
    if o.get("search", "shared") not in om.SEARCHES:
        raise RecipeError(f"smoothquant search must be one of {om.SEARCHES}, got {o['search']!r}")
    if o.get("search", "shared") != "shared" and alpha != "auto":
        raise RecipeError(f"smoothquant search {o['search']!r} needs alpha: auto")
    if quantizer == "gptq" and w.type != "int":
        raise RecipeError("smoothquant quantizer gptq needs integer weights (weights: type int)")


METHOD_CHECKS: dict[str, Callable[[Recipe], None]] = {
    "rtn": _check_rtn,
    "gptq": _check_gptq,
    "llm_int8": _check_outlier_method,
    "awq": _check_outlier_method,
    "smoothquant": _check_outlier_method,
}


def check_recipe(recipe: Recipe) -> None:
    """The load-time checks of a recipe: its ignore patterns compile, its method's options are
    known and in range. Messages name the option; the caller prefixes the recipe's file."""
    check_ignore_patterns(recipe.ignore)
    try:
        METHOD_CHECKS.get(recipe.method, lambda r: None)(recipe)
    except RecipeError as err:  # the methods' own checks say "recipe NAME: ..."; the caller names the file
        raise RecipeError(str(err).removeprefix(f"recipe {recipe.name}: ")) from None
