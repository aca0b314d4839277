"""GPTQ over a whole model: the sequential engine feeds each block's Linear inputs into Hessians,
the solver in quantmill/solvers/gptq.py quantizes each Linear, and the quantized block produces
the next block's inputs (so the error of earlier blocks is seen by later ones, as in the paper).

Linears that read the same tensor (q/k/v; gate/up) share one Hessian. With `true_sequential`
the groups of a block are quantized in forward order, each seeing the already-quantized ones.
Per-block results go to the engine's partial folder, so a killed run resumes at the next block
and ends bit-identical to an uninterrupted one.

`quantize_block` is the per-block step with the per-Linear quantizer as a parameter (GPTQ here;
AWQ and SmoothQuant, quantmill/methods/awq.py and smoothquant.py, scale a block first, then call
it with GPTQ or RTN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn

from pydantic import Field

from quantmill.core.errors import RecipeError
from quantmill.core.qparams import QuantizedWeight
from quantmill.methods.base import MethodContext, MethodResult, layer_granularity, target_linears
from quantmill.methods.options import ClipOptions, MethodOptions, options_of, parse_options
from quantmill.methods.recipe import Recipe
from quantmill.methods.schemes import static_input_qparams
from quantmill.model.arch import layout_of
from quantmill.model.sequential import BlockInputs, run_sequential
from quantmill.solvers.gptq import GPTQOptions, HessianAccumulator, gptq_quantize


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


def _input_groups(block: nn.Module, names: list[str], forward) -> list[list[str]]:
    """The block's Linears grouped by the tensor they read, in forward order."""
    order: list[list[str]] = []
    last: dict[str, Any] = {"x": None}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if any(name in g for g in order):
                return
            if args[0] is last["x"] and order:
                order[-1].append(name)
            else:
                order.append([name])
            last["x"] = args[0]

        return record

    modules = dict(block.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        forward(first_batch_only=True)
    finally:
        for h in handles:
            h.remove()
    return order


def _hessians(block: nn.Module, groups: list[list[str]], forward) -> dict[str, HessianAccumulator]:
    """One Hessian per input group, fed by every calibration batch."""
    modules = dict(block.named_modules())
    hessians: dict[str, HessianAccumulator] = {}
    handles = []
    for group in groups:
        acc = HessianAccumulator()
        for name in group:
            hessians[name] = acc
        handles.append(modules[group[0]].register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0].reshape(-1, args[0].shape[-1]))))
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return hessians


def _weight_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    q = qw.q if qw.q.dtype.is_floating_point else qw.q.to(torch.int8)  # fp8 stays e4m3
    out = {f"{name}.q": q, f"{name}.scale": qw.scale, f"{name}.zero_point": qw.zero_point}
    if qw.g_idx is not None:
        out[f"{name}.g_idx"] = qw.g_idx
    return out


def _weight_from_tensors(name: str, t: dict[str, torch.Tensor], bits: int, group_size: int | None) -> QuantizedWeight:
    # q stays int8 (bits <= 8) and shares the block result's memory: an int32 copy of every
    # weight would cost as much host memory as the float model itself.
    return QuantizedWeight(
        t[f"{name}.q"], t[f"{name}.scale"], t[f"{name}.zero_point"], bits,
        group_size if f"{name}.g_idx" not in t else None, t.get(f"{name}.g_idx"),
    )


# quantize_one(full name, float weight W [out, in], Hessian H [in, in]) -> (integer weight, report fields)
WeightQuantizer = Callable[[str, torch.Tensor, torch.Tensor], tuple[QuantizedWeight, dict[str, Any]]]


def block_linear_names(block: nn.Module, index: int, prefix: str, plan: dict[str, Any]) -> list[str]:
    """The block's Linears (names relative to the block) that the plan quantizes."""
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and f"{prefix}.{index}.{n}" in plan]


def quantize_block(
    index: int,
    block: nn.Module,
    inputs: BlockInputs,
    forward: Callable[[], list[torch.Tensor]],
    prefix: str,
    names: list[str],
    quantize_one: WeightQuantizer,
    true_sequential: bool = False,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Quantize the named Linears of one block in place, each seeing its input Hessian.

    Linears that read the same tensor share one Hessian; with `true_sequential` each input group
    is quantized after the earlier ones, on inputs computed by the already-quantized block. Each
    weight becomes its de-quantized value; returns the integer tensors (for the partial folder)
    and one report row per Linear (the quantizer's fields, then rel_output_error =
    sqrt(tr(dW H dW^T) / tr(W H W^T))).
    """
    modules = dict(block.named_modules())

    def run(first_batch_only: bool = False) -> None:
        """The block over the calibration batches for its hooks only; each batch's output is
        dropped at once (the engine computes the next block's inputs after quantization), so the
        Hessian pass never holds a second copy of the activations."""
        with torch.no_grad():
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                block(hidden, **kwargs)
                if first_batch_only:
                    break

    groups = _input_groups(block, names, run)
    stages = [[n for g in groups for n in g]] if not true_sequential else groups
    tensors: dict[str, torch.Tensor] = {}
    report: list[dict[str, Any]] = []
    for stage in stages:
        hessians = _hessians(block, [g for g in groups if g[0] in stage], run)
        for name in stage:
            full = f"{prefix}.{index}.{name}"
            linear = modules[name]
            W = linear.weight.data.float()
            H = hessians[name].H
            qw, fields = quantize_one(full, W, H)
            Q = qw.dequantize()
            dW = Q - W
            num = torch.trace(dW @ H @ dW.T).item()
            den = torch.trace(W @ H @ W.T).item()
            report.append({"module": full, "block": index, **fields, "rel_output_error": (num / den) ** 0.5 if den > 0 else 0.0})
            linear.weight.data.copy_(Q.to(linear.weight.dtype))
            tensors.update(_weight_tensors(name, qw))
    return {k: v.cpu() for k, v in tensors.items()}, report


def restore_block_weights(index: int, block: nn.Module, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]], prefix: str, bits: int, plan: dict[str, Any]) -> None:
    """Write a finished block's de-quantized weights back (resuming from the partial folder)."""
    modules = dict(block.named_modules())
    for row in rows:
        name = row["module"][len(f"{prefix}.{index}.") :]
        qw = _weight_from_tensors(name, tensors, bits, plan[row["module"]][1])
        modules[name].weight.data.copy_(qw.dequantize().to(modules[name].weight.dtype))


def collect_weights(results: list[tuple[dict[str, torch.Tensor], dict[str, Any]]], prefix: str, bits: int, plan: dict[str, Any]) -> tuple[dict[str, QuantizedWeight], list[dict[str, Any]]]:
    """The integer weights and report rows of every block of a walk (metadata key `report`)."""
    weights: dict[str, QuantizedWeight] = {}
    report: list[dict[str, Any]] = []
    for index, (tensors, meta) in enumerate(results):
        for row in meta["report"]:
            name = row["module"][len(f"{prefix}.{index}.") :]
            weights[row["module"]] = _weight_from_tensors(name, tensors, bits, plan[row["module"]][1])
            report.append(row)
    return weights, report


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
    recipe's activation scheme, if any, is applied at run time as for the rtn method."""
    recipe = ctx.recipe
    plan = layer_granularity(recipe, target_linears(ctx.model, recipe))
    options = options_of(recipe, GptqMethodOptions)
    quantize_one = gptq_quantizer(gptq_options(recipe, options, plan))
    prefix = layout_of(ctx.model).layers
    true_sequential = options.true_sequential
    bits = recipe.weights.bits

    def visit(index: int, block: nn.Module, inputs: BlockInputs, forward):
        names = block_linear_names(block, index, prefix, plan)
        tensors, report = quantize_block(index, block, inputs, forward, prefix, names, quantize_one, true_sequential)
        return tensors, {"report": report}, None  # engine re-runs the quantized block

    def restore(index: int, block: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        restore_block_weights(index, block, tensors, meta["report"], prefix, bits, plan)

    results = run_sequential(
        ctx.model, ctx.calibration, visit, device=ctx.device, batch_size=8, partial_dir=ctx.partial_dir,
        restore=restore, desc=f"gptq {recipe.name}", on_block_done=ctx.on_block_done,
    )
    weights, report = collect_weights(results, prefix, bits, plan)
    fallbacks = [r["module"] for r in report if r.get("fallback_rtn")]
    # Static inputs (W8A8 / fp8 with calibrated ranges): the observer on the float model's stats,
    # as the rtn method does.
    input_qparams, act_rows = static_input_qparams(recipe, ctx.stats, list(weights))
    for row in report:
        row.update(act_rows.get(row["module"], {}))
    return MethodResult(weights, report, {"gptq_rtn_fallbacks": fallbacks} if fallbacks else {}, input_qparams=input_qparams)


class QuantizerOptions(MethodOptions):
    """What AWQ and SmoothQuant share: `quantizer`, how the (scaled) weights are quantized (rtn or
    gptq), and with gptq the GPTQ options. A recipe writes those flat beside the method's own
    (its hash is the dict as written); the model holds them nested, as `gptq`."""

    quantizer: Literal["rtn", "gptq"] = "rtn"
    gptq: GptqMethodOptions | None = None

    @classmethod
    def known(cls) -> set[str]:
        return set(cls.model_fields) - {"gptq"} | set(GptqMethodOptions.model_fields)

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        quantizer = data.get("quantizer", "rtn")
        if quantizer not in ("rtn", "gptq"):
            raise ValueError(f"{cls.method} quantizer must be 'rtn' or 'gptq', got {quantizer!r}")
        own = {k: v for k, v in data.items() if k not in GptqMethodOptions.model_fields}
        flat = {k: v for k, v in data.items() if k in GptqMethodOptions.model_fields}
        if flat and quantizer != "gptq":
            raise ValueError(f"option(s) {sorted(flat)} apply to quantizer: gptq only")
        return {**own, "gptq": parse_options(flat, GptqMethodOptions)} if quantizer == "gptq" else own

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
