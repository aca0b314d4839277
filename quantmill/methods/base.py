"""What every method shares: its context and result, which Linears a recipe targets, the error
report of one weight, and the helpers of the block-by-block walks (batches, float copies).

The bottom of the methods layer: method modules import it, it imports no method.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from quantmill.core.errors import RecipeError, SourceError
from quantmill.core.qparams import QuantizedWeight
from quantmill.methods.recipe import Recipe
from quantmill.model.arch import get_attr, model_type_of, quantizable
from quantmill.model.sequential import BlockInputs
from quantmill.solvers.observers import ActivationStats

# The checkpoint format of every method that writes plain quantized Linears (quantmill/io/checkpoint.py).
COMPRESSED_TENSORS = "compressed-tensors"


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
    """The decoder-block Linears the recipe quantizes, by full module name, in block order.

    An architecture the table refuses (GPT-2's Conv1D) is an error, and so are blocks with no
    nn.Linear at all: quantizing nothing without a word is never the right answer."""
    prefix = quantizable(model).layout.layers
    targets, linears = {}, 0
    for i, block in enumerate(get_attr(model, prefix)):
        for name, module in block.named_modules():
            full = f"{prefix}.{i}.{name}"
            if isinstance(module, nn.Linear):
                linears += 1
                if not is_ignored(full, recipe.ignore):
                    targets[full] = module
    if not linears:
        raise SourceError(f"architecture {model_type_of(model)!r}: the decoder blocks under {prefix} hold no nn.Linear: nothing to quantize")
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


def check_ignore_patterns(patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise RecipeError(f"ignore pattern {pattern!r} is not a valid regular expression ({err})") from None


BATCH_SIZE = 8  # calibration samples per batch in the walks (as the GPTQ walk)


def search_batches(inputs: BlockInputs, samples: int) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The first calibration batches (about `samples` samples, at least one batch) with the same
    shape as the first, and the first batch's keyword arguments (position embeddings, mask)."""
    first = inputs.hidden[0]
    batches = [first]
    for h in inputs.hidden[1:]:
        if sum(b.shape[0] for b in batches) + h.shape[0] > samples or h.shape != first.shape:
            break
        batches.append(h)
    return batches, inputs.kwargs[0]


def block_params(block: nn.Module) -> dict[str, torch.Tensor]:
    return {f"float.{n}": p.detach().cpu().clone() for n, p in block.named_parameters()}


def restore_params(block: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    params = dict(block.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("float."):
                p = params[key[len("float.") :]]
                p.copy_(value.to(device=p.device, dtype=p.dtype))
