"""One protocol and one driver for the methods that quantize a model block by block (gptq, awq,
smoothquant).

A method says two things (`BlockMethod`): how it prepares a block before its weights are
quantized (AWQ's or SmoothQuant's folds; nothing for GPTQ) and which weight quantizer it uses
(GPTQ or RTN). `run_blocks` owns everything else, written once: the walk over the sequential
engine, the block's partial result and its restore on resume, the collection of the integer
weights and report rows, the RTN-fallback notes and the static input scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from quantmill.methods.base import BATCH_SIZE, MethodContext, MethodResult, block_params, layer_granularity, restore_params, target_linears
from quantmill.methods.block_quant import Plan, WeightQuantizer, block_linear_names, collect_weights, quantize_block, restore_block_weights
from quantmill.methods.rtn import rtn
from quantmill.methods.schemes import static_input_qparams
from quantmill.model.arch import layout_of
from quantmill.model.sequential import BlockInputs, run_sequential
from quantmill.model.stats import block_stats, block_stats_visitor
from quantmill.solvers.observers import DEFAULT_NBINS, ActivationStats


@dataclass
class Prepared:
    """What a prepare step says about its block: metadata (JSON, kept in the block's partial
    result and handed back after the walk) and report fields per Linear (name inside the block,
    added to its row of the method's report)."""

    meta: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


# prepare(index, block on the device, its calibration inputs) -> Prepared. It changes the block's
# float parameters in place (the folds); the driver keeps them for a resume.
PrepareBlock = Callable[[int, nn.Module, BlockInputs], Prepared]


@dataclass(frozen=True)
class BlockMethod:
    """A block-by-block method: how it prepares a block, and how the prepared weights are quantized.

    `quantizer(plan)`: the per-Linear quantizer (GPTQ or RTN) run on each prepared block inside
    the walk, so each block sees the quantized earlier ones, as in GPTQ. None: the walk stays
    float and the rtn method rounds the prepared model after it (SmoothQuant with RTN: its folds
    are exact, so every block sees the float model's inputs, the ones the stats describe).
    `record_stats`: static input scales from the prepared blocks' own input statistics, recorded
    during the walk, instead of the stats stage's (SmoothQuant moves range out of the inputs).
    `weights_key`: the prefix of the integer weights in a block's partial result (SmoothQuant's
    partial results have always held them under "gptq.", beside its statistics; kept, so a
    partial written before this driver still resumes).
    """

    name: str
    quantizer: Callable[[Plan], WeightQuantizer] | None
    prepare: PrepareBlock | None = None
    true_sequential: bool = False
    record_stats: bool = False
    weights_key: str = ""


@dataclass
class BlockRun:
    """What the walk produced: the method's result, each block's metadata (its prepare step's,
    plus `seconds`, and `report` when quantized in the walk), and the input statistics the
    static scales came from (the stats stage's, or those recorded on the prepared blocks)."""

    result: MethodResult
    metas: list[dict[str, Any]]
    stats: dict[str, ActivationStats]


def _weights_of(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k[len(key) :]: v for k, v in tensors.items() if k.startswith(key)} if key else tensors


def run_blocks(ctx: MethodContext, method: BlockMethod) -> BlockRun:
    """Walk the decoder blocks: prepare each one, record its statistics if asked, quantize it;
    resume from `ctx.partial_dir`; then collect the weights, notes and static input scales."""
    recipe = ctx.recipe
    plan = layer_granularity(recipe, target_linears(ctx.model, recipe))
    prefix = layout_of(ctx.model).layers
    bits = recipe.weights.bits
    quantize_one = method.quantizer(plan) if method.quantizer is not None else None
    record = block_stats_visitor(DEFAULT_NBINS) if method.record_stats else None

    def visit(index: int, block: nn.Module, inputs: BlockInputs, forward: Callable[[], list[torch.Tensor]]):
        prepared = method.prepare(index, block, inputs) if method.prepare is not None else Prepared()
        tensors: dict[str, torch.Tensor] = {}
        meta = {**prepared.meta, "rows": prepared.rows} if prepared.rows else dict(prepared.meta)
        outputs = None  # the engine runs the block for the next block's inputs
        if record is not None:  # the prepared (float) block's own input statistics
            tensors, stats_meta, outputs = record(index, block, inputs, forward)
            meta["aliases"] = stats_meta["aliases"]
        if method.prepare is not None:
            tensors.update(block_params(block))  # the folded float weights and norms, for a resume
        if quantize_one is not None:
            names = block_linear_names(block, index, prefix, plan)
            weights, meta["report"] = quantize_block(index, block, inputs, prefix, names, quantize_one, method.true_sequential)
            tensors.update({method.weights_key + k: v for k, v in weights.items()})
            outputs = None  # the next block's inputs come from the quantized block
        return tensors, meta, outputs

    def restore(index: int, block: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        restore_params(block, tensors)  # the folds (no-op without a prepare step)
        if quantize_one is not None:
            restore_block_weights(index, block, _weights_of(tensors, method.weights_key), meta["report"], prefix, bits, plan)

    results = run_sequential(
        ctx.model, ctx.calibration, visit, device=ctx.device, batch_size=BATCH_SIZE, partial_dir=ctx.partial_dir,
        restore=restore, desc=f"{method.name} {recipe.name}", on_block_done=ctx.on_block_done,
    )
    stats = ctx.stats
    if record is not None:
        stats = {}
        for index, (tensors, meta) in enumerate(results):
            stats.update(block_stats(tensors, meta["aliases"], f"{prefix}.{index}"))
    if quantize_one is None:
        plain = recipe.model_copy(update={"options": {}})  # plain RTN: the method's options are not rtn's
        result = rtn(MethodContext(ctx.model, plain, stats, ctx.calibration, ctx.device))
    else:
        weights, report = collect_weights([(_weights_of(t, method.weights_key), m) for t, m in results], prefix, bits, plan)
        input_qparams, act_rows = static_input_qparams(recipe, stats, list(weights))  # empty unless static
        for row in report:
            row.update(act_rows.get(row["module"], {}))
        fallbacks = [r["module"] for r in report if r.get("fallback_rtn")]
        result = MethodResult(weights, report, {"gptq_rtn_fallbacks": fallbacks} if fallbacks else {}, input_qparams=input_qparams)
    for row in result.report:  # the prepare steps' fields, after the quantizer's and the scales'
        index, name = row["module"][len(prefix) + 1 :].split(".", 1)
        row.update(results[int(index)][1].get("rows", {}).get(name, {}))
    return BlockRun(result, [meta for _, meta in results], stats)
