"""One block's quantization step: the block's Linears quantized in place, each seeing the
Hessian of its calibration inputs, with the per-Linear quantizer (GPTQ, RTN) as a parameter; and
the form its integer weights take in a block's partial result (write, restore, collect).

The per-block methods' driver (quantmill/methods/driver.py) calls it once per block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from quantmill.core.qparams import QuantizedWeight
from quantmill.model.sequential import BlockInputs
from quantmill.solvers.gptq import HessianAccumulator

# Full Linear name -> (granularity, group size): `layer_granularity`'s plan of a recipe.
Plan = dict[str, tuple[str, int | None]]

# quantize_one(full name, float weight W [out, in], Hessian H [in, in]) -> (integer weight, report fields)
WeightQuantizer = Callable[[str, torch.Tensor, torch.Tensor], tuple[QuantizedWeight, dict[str, Any]]]


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


def block_linear_names(block: nn.Module, index: int, prefix: str, plan: Plan) -> list[str]:
    """The block's Linears (names relative to the block) that the plan quantizes."""
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and f"{prefix}.{index}.{n}" in plan]


def quantize_block(
    index: int,
    block: nn.Module,
    inputs: BlockInputs,
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


def restore_block_weights(index: int, block: nn.Module, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]], prefix: str, bits: int, plan: Plan) -> None:
    """Write a finished block's de-quantized weights back (resuming from the partial folder)."""
    modules = dict(block.named_modules())
    for row in rows:
        name = row["module"][len(f"{prefix}.{index}.") :]
        qw = _weight_from_tensors(name, tensors, bits, plan[row["module"]][1])
        modules[name].weight.data.copy_(qw.dequantize().to(modules[name].weight.dtype))


def collect_weights(results: list[tuple[dict[str, torch.Tensor], dict[str, Any]]], prefix: str, bits: int, plan: Plan) -> tuple[dict[str, QuantizedWeight], list[dict[str, Any]]]:
    """The integer weights and report rows of every block of a walk (metadata key `report`)."""
    weights: dict[str, QuantizedWeight] = {}
    report: list[dict[str, Any]] = []
    for index, (tensors, meta) in enumerate(results):
        for row in meta["report"]:
            name = row["module"][len(f"{prefix}.{index}.") :]
            weights[row["module"]] = _weight_from_tensors(name, tensors, bits, plan[row["module"]][1])
            report.append(row)
    return weights, report
