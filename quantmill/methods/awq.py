"""AWQ (Lin et al. 2023) as a recipe method: per decoder block, on the block's calibration inputs
(the outputs of the already quantized earlier blocks), search and fold AWQ scales (and optionally
clip), then quantize the block with RTN or GPTQ (`options.quantizer`), exactly as the GPTQ walk
does. Only float weights and norms change before quantization, so the checkpoint is the usual
compressed-tensors one. The search itself is quantmill/solvers/awq.py.
"""

from __future__ import annotations

import torch.nn as nn
from pydantic import Field

from quantmill.core.errors import RecipeError
from quantmill.methods.base import MethodContext, MethodResult, search_batches
from quantmill.methods.driver import BlockMethod, Prepared, run_blocks
from quantmill.methods.gptq import QuantizerOptions
from quantmill.methods.options import options_of
from quantmill.methods.recipe import Recipe
from quantmill.methods.rtn import rtn_quantizer
from quantmill.model.arch import block_folds, layout_of
from quantmill.model.sequential import BlockInputs
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
    prefix = layout_of(ctx.model).layers
    producer_of = arch_names.producer_of()

    def prepare(index: int, block: nn.Module, inputs: BlockInputs) -> Prepared:
        """Search and fold the block's AWQ scales (and clip); report each Linear's search."""
        batches, kwargs = search_batches(inputs, samples)
        found = apply_awq_to_layer(block, arch_names, batches, kwargs, w.bits, w.group_size, w.symmetric, grid, clip, prefix=f"{prefix}.{index}")
        rows: dict[str, dict[str, float]] = {}
        for name, producer in producer_of.items():
            scales = found["scales"].get(producer, {})
            errors = scales.get("errors") or []
            if errors:
                rows[name] = {
                    "awq_ratio": scales["ratio"],
                    "awq_search_error_ratio": min(errors) / errors[0] if errors[0] > 0 else 1.0,  # vs plain RTN, on the search tokens
                }
        for name, mean_clip in found["clip"].items():
            rows.setdefault(name, {})["awq_mean_clip"] = mean_clip
        return Prepared(rows=rows)

    # RTN runs inside the walk too, so each block's search sees the quantized earlier blocks.
    quantizer = lambda plan: options.weight_quantizer(recipe, plan) or rtn_quantizer(plan, recipe)  # noqa: E731
    run = run_blocks(ctx, BlockMethod("awq", quantizer, prepare, options.true_sequential))
    return MethodResult(run.result.weights, run.result.report, {"awq_quantizer": options.quantizer, **run.result.notes})


def check_awq(recipe: Recipe) -> None:
    """Load-time checks beyond the options model: integer group-wise weights, weight-only."""
    options_of(recipe, AwqOptions)
    w = recipe.weights
    if w.type != "int" or w.granularity != "group":
        raise RecipeError("awq searches scales for integer group-wise weights (weights: type int, granularity group)")
    if recipe.activations is not None:
        raise RecipeError("awq is weight-only: remove `activations`")
