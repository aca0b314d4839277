"""AWQ (Lin et al. 2023) as a recipe method: per decoder block, on the block's calibration inputs
(the outputs of the already quantized earlier blocks), search and fold AWQ scales (and optionally
clip), then quantize the block with RTN or GPTQ (`options.quantizer`), exactly as the GPTQ walk
does. Only float weights and norms change before quantization, so the checkpoint is the usual
compressed-tensors one. The search itself is quantmill/solvers/awq.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pydantic import Field

from quantmill.core.errors import RecipeError
from quantmill.methods.base import (
    BATCH_SIZE,
    MethodContext,
    MethodResult,
    block_params,
    layer_granularity,
    restore_params,
    search_batches,
    target_linears,
)
from quantmill.methods.gptq import (
    QuantizerOptions,
    block_linear_names,
    collect_weights,
    quantize_block,
    restore_block_weights,
)
from quantmill.methods.options import options_of
from quantmill.methods.recipe import Recipe
from quantmill.methods.rtn import rtn_quantizer
from quantmill.model.arch import block_folds, layout_of
from quantmill.model.sequential import BlockInputs, run_sequential
from quantmill.solvers.awq import apply_awq_to_layer


class AwqOptions(QuantizerOptions):
    """awq's options, beside `quantizer` (rtn | gptq, gptq with the GPTQ options)."""

    method = "awq"
    grid: int = Field(20, ge=1, strict=True, description="an integer >= 1")
    clip: bool = Field(True, strict=True, description="true or false")
    search_samples: int = Field(8, ge=1, strict=True, description="an integer >= 1")


def awq(ctx: MethodContext) -> MethodResult:
    """AWQ (Lin et al. 2023) then RTN or GPTQ, block by block over the sequential engine.

    Options: quantizer (rtn | gptq; gptq also takes the GPTQ options), grid (scale-search and
    clip-search grid, 20), clip (AWQ's weight clipping search, true), search_samples (calibration
    samples the searches run on, 8; whole batches of 8).
    """

    recipe = ctx.recipe
    options = options_of(recipe, AwqOptions)
    w = recipe.weights
    if w.type != "int" or w.granularity != "group":
        raise RecipeError(f"recipe {recipe.name}: awq searches scales for integer group-wise weights (weights: type int, granularity group)")
    if recipe.activations is not None:
        raise RecipeError(f"recipe {recipe.name}: awq is weight-only: remove `activations`")
    grid, clip, samples = options.grid, options.clip, options.search_samples

    arch_names = block_folds(ctx.model, "awq")
    plan = layer_granularity(recipe, target_linears(ctx.model, recipe))
    prefix = layout_of(ctx.model).layers
    producer_of = arch_names.producer_of()
    quantize_one = options.weight_quantizer(recipe, plan) or rtn_quantizer(plan, recipe)
    true_sequential = options.true_sequential

    def visit(index: int, block: nn.Module, inputs: BlockInputs, forward):
        batches, kwargs = search_batches(inputs, samples)
        found = apply_awq_to_layer(block, arch_names, batches, kwargs, w.bits, w.group_size, w.symmetric, grid, clip, prefix=f"{prefix}.{index}")
        names = block_linear_names(block, index, prefix, plan)
        tensors, rows = quantize_block(index, block, inputs, forward, prefix, names, quantize_one, true_sequential)
        for row in rows:
            name = row["module"][len(f"{prefix}.{index}.") :]
            scales = found["scales"].get(producer_of.get(name, ""), {})
            errors = scales.get("errors") or []
            if errors:
                row["awq_ratio"] = scales["ratio"]
                row["awq_search_error_ratio"] = min(errors) / errors[0] if errors[0] > 0 else 1.0  # vs plain RTN, on the search tokens
            if name in found["clip"]:
                row["awq_mean_clip"] = found["clip"][name]
        tensors.update(block_params(block))  # norms (and Linear rows) the folds changed, for a resume
        return tensors, {"report": rows}, None  # the engine re-runs the quantized block

    def restore(index: int, block: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        restore_params(block, tensors)
        restore_block_weights(index, block, tensors, meta["report"], prefix, w.bits, plan)

    results = run_sequential(
        ctx.model, ctx.calibration, visit, device=ctx.device, batch_size=BATCH_SIZE, partial_dir=ctx.partial_dir,
        restore=restore, desc=f"awq {recipe.name}", on_block_done=ctx.on_block_done,
    )
    weights, report = collect_weights(results, prefix, w.bits, plan)
    notes: dict[str, Any] = {"awq_quantizer": options.quantizer}
    fallbacks = [r["module"] for r in report if r.get("fallback_rtn")]
    if fallbacks:
        notes["gptq_rtn_fallbacks"] = fallbacks
    return MethodResult(weights, report, notes)


def check_awq(recipe: Recipe) -> None:
    """Load-time checks beyond the options model: integer group-wise weights, weight-only."""
    options_of(recipe, AwqOptions)
    w = recipe.weights
    if w.type != "int" or w.granularity != "group":
        raise RecipeError("awq searches scales for integer group-wise weights (weights: type int, granularity group)")
    if recipe.activations is not None:
        raise RecipeError("awq is weight-only: remove `activations`")
