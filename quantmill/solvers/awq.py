"""AWQ (Lin et al. 2023): activation-aware scaling before low-bit, group-wise weight quantization.

A few input channels j carry large activations (mean|X_j| is high); rounding errors in the
weight columns W[:, j] are amplified by them. Scaling W[:, j] up by s_j (and X_j down by s_j)
before quantizing gives those columns a relatively finer grid: Y = Q(W diag(s)) (X / s). AWQ
searches s = mean|X|^ratio (normalised so that sqrt(max s * min s) = 1) over ratio in [0, 1),
keeping the one with the smallest output error on calibration inputs; ratio 0 is plain RTN, so
the search can only lower that error on its inputs. The division by s is folded into the op that
produces X, so the float model is unchanged; the caller then RTN- (or GPTQ-) quantizes it.

Folds, from the architecture table's row for the model (`BlockNames`, quantmill/model/arch.py); for
the Llama family:
  input_layernorm          -> q_proj, k_proj, v_proj
  self_attn.v_proj (rows)  -> o_proj (columns; GQA: one scale per v row, see smoothquant.gqa_column_index)
  post_attention_layernorm -> gate_proj, up_proj
  mlp.up_proj (rows)       -> down_proj (columns; exact through act(gate) * up)
Optional `clip_search` (AWQ's auto-clip) then shrinks each group's weight range where that
lowers the group's output error; it changes the float weights (not exact), q/k are left out as
in the paper's code since their errors go through the softmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from quantmill.core.errors import RecipeError
from quantmill.core.grid import IntGrid
from quantmill.core.qparams import quantize_weight_rtn
from quantmill.solvers.smoothquant import (
    block_output,
    attention_heads,
    fold_smoothing,
    fold_smoothing_linear,
    get_submodule,
    gqa_attention,
    gqa_column_index,
)
from quantmill.solvers.folds import BlockNames


def _check_scheme(linears: Sequence[nn.Linear], bits: int, group_size: int, name: str) -> None:
    if not 2 <= bits <= 8:
        raise RecipeError(f"awq bits must be in 2..8, got {bits}")
    for lin in linears:
        if group_size <= 0 or lin.in_features % group_size:
            raise RecipeError(f"{name}: group_size {group_size} does not divide in_features {lin.in_features}")


def _rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Group-wise round-to-nearest, de-quantized (what the quantized model multiplies by)."""
    return quantize_weight_rtn(W, IntGrid.for_weights(bits, symmetric), "group", group_size).dequantize()


def normalised_scales(act_mean_abs: torch.Tensor, ratio: float) -> torch.Tensor:
    """s = mean|X|^ratio / sqrt(max * min): centred on 1 so W * s stays in range."""
    s = act_mean_abs.float().clamp(min=1e-4).pow(ratio)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search_scales(
    linears: Sequence[nn.Linear],
    inputs: torch.Tensor,
    act_mean_abs: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    grid: int = 20,
    col_index: torch.Tensor | None = None,
    name: str = "linears",
) -> tuple[torch.Tensor, list[float]]:
    """Search s = mean|X|^ratio, ratio = i / grid for i < grid, for Linears sharing the input X.

    Error of a ratio: mean over tokens and outputs of all Linears of (X W^T - (X / s) Q(W s)^T)^2,
    with Q the group RTN. Returns the best s and the error per ratio (the curve).
    col_index maps each input column of the Linears to its entry of s (GQA v -> o), None: identity.

    With D = Q(W s) / s - W, the summed error is ||X D^T||^2 = sum((D G) * D) for the Gram matrix
    G = X^T X, formed once: each ratio then costs out x C^2 instead of tokens x C x out (on demo's
    64 x 512 calibration tokens, 34x to 57x fewer operations). G and the products are float64, so
    the errors agree with the direct float32 sums to about 1e-6 relative and, on the demo model,
    pick the same ratio for every group (bench/awq_gram_check.py compares the two forms).
    """
    _check_scheme(linears, bits, group_size, name)
    C = linears[0].in_features
    dev = linears[0].weight.device
    X = inputs.reshape(-1, C).to(dev)
    G = torch.zeros(C, C, dtype=torch.float64, device=dev)
    for rows in X.split(4096):  # the float64 copy of X one slice at a time
        rows = rows.double()
        G.addmm_(rows.t(), rows)
    Ws = [lin.weight.detach().float() for lin in linears]
    n_out = X.shape[0] * sum(W.shape[0] for W in Ws)
    errors: list[float] = []
    best_s, best_err = None, float("inf")
    for i in range(grid):
        s = normalised_scales(act_mean_abs.to(dev), i / grid)
        s_cols = s if col_index is None else s[col_index.to(dev)]
        err = 0.0
        for W in Ws:
            D = (_rtn(W * s_cols[None, :], bits, group_size, symmetric) / s_cols[None, :] - W).double()
            err += float(((D @ G) * D).sum())
        err /= n_out
        errors.append(err)
        if err < best_err:
            best_s, best_err = s, err
    if best_s is None:  # every error was nan: keep the weights as they are
        best_s = torch.ones_like(act_mean_abs, dtype=torch.float32, device=dev)
    return best_s, errors


@torch.no_grad()
def clip_search(
    linear: nn.Linear,
    inputs: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    grid: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    apply: bool = True,
    name: str = "linear",
) -> torch.Tensor:
    """Per (output row, group) clip ratio in (1 - max_shrink, 1] minimising the group's output error.

    For each candidate max_val = ratio * max|W_g|, the error is mean over tokens of
    (X_g . (Q(clamp(W_g, -max_val, max_val)) - W_g))^2. With apply=True the weight is clamped in
    place. Returns the ratios [out, in // group_size].
    """
    _check_scheme([linear], bits, group_size, name)
    W = linear.weight.detach().float()
    out, C = W.shape
    ng = C // group_size
    X = inputs.reshape(-1, C).to(W.device).float()
    if X.shape[0] > max_tokens:
        X = X[torch.linspace(0, X.shape[0] - 1, max_tokens).long().to(W.device)]
    Xg = X.reshape(-1, ng, group_size)
    rows_per_chunk = max(1, 2**24 // max(1, X.shape[0] * C))
    best_ratio = torch.ones(out, ng, device=W.device)
    for r0 in range(0, out, rows_per_chunk):
        Wg = W[r0 : r0 + rows_per_chunk].reshape(-1, ng, group_size)
        org_max = Wg.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full(Wg.shape[:2], float("inf"), device=W.device)
        for i in range(int(max_shrink * grid)):
            ratio = 1.0 - i / grid
            cur = torch.maximum(torch.minimum(Wg, org_max * ratio), -org_max * ratio)
            Q = _rtn(cur.reshape(-1, C), bits, group_size, symmetric).reshape(Wg.shape)
            err = torch.einsum("ngk,ogk->nog", Xg, Q - Wg).pow(2).mean(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[r0 : r0 + Wg.shape[0]][better] = ratio
    if apply:
        max_val = (W.reshape(out, ng, group_size).abs().amax(dim=-1) * best_ratio)[..., None]
        clipped = torch.maximum(torch.minimum(W.reshape(out, ng, group_size), max_val), -max_val)
        linear.weight.copy_(clipped.reshape(out, C).to(linear.weight.dtype))
    return best_ratio


@torch.no_grad()
def capture_linear_inputs(
    layer: nn.Module, names: Sequence[str], block_inputs: torch.Tensor | Sequence[torch.Tensor],
    layer_kwargs: Mapping[str, Any], prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Inputs [tokens, C] of the named Linears, recorded by forward hooks while the layer runs."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    for n in names:
        mod = get_submodule(layer, n, prefix)
        hooks.append(mod.register_forward_hook(
            lambda m, args, out, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        ))
    try:
        block_output(layer, block_inputs, layer_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def apply_awq_to_layer(
    layer: nn.Module,
    names: BlockNames,
    block_inputs: torch.Tensor | Sequence[torch.Tensor],
    layer_kwargs: Mapping[str, Any],
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    grid: int = 20,
    clip: bool = False,
    prefix: str = "",
) -> dict[str, Any]:
    """Search and fold AWQ scales (and optionally clip) in a decoder layer, in place, through the
    folds of `names` (the architecture table's row for the model; clip skips `names.no_clip`).

    Every group is searched on the Linear inputs of the float layer: each fold leaves the inputs
    of the other groups unchanged, so one capture serves all. Returns a report: per group the
    chosen ratio and error curve; per clipped Linear the mean clip ratio.
    """
    def where(n: str) -> str:
        return f"{prefix}.{n}" if prefix else n

    if not names.folds:
        raise RecipeError(f"{prefix or 'decoder layer'}: no folds in the architecture table for this block")
    for n in names.linears:  # refuse before any fold, so a bad scheme leaves the layer untouched
        _check_scheme([get_submodule(layer, n, prefix)], bits, group_size, where(n))
    for f in names.folds_of("linear_gqa"):
        gqa_attention(f, prefix)
    feats = capture_linear_inputs(layer, [f.consumers[0] for f in names.folds], block_inputs, layer_kwargs, prefix)
    report: dict[str, Any] = {"scales": {}, "clip": {}}
    for fold in names.folds:
        producer, kind, cons = fold.producer, fold.kind, fold.consumers
        linears = [get_submodule(layer, n, prefix) for n in cons]
        if not all(isinstance(lin, nn.Linear) for lin in linears):
            raise RecipeError(f"{where(producer)}: feeds a module that is not a Linear")
        X = feats[cons[0]]
        mean_abs = X.abs().float().mean(dim=0)
        col_index = None
        if kind == "linear_gqa":
            H, H_kv, d = attention_heads(layer, gqa_attention(fold, prefix), prefix)
            mean_abs = mean_abs.reshape(H_kv, H // H_kv, d).mean(dim=1).reshape(-1)
            col_index = gqa_column_index(H, H_kv, d)
        s, errors = awq_search_scales(linears, X, mean_abs, bits, group_size, symmetric, grid, col_index, where(cons[0]))
        prod = get_submodule(layer, producer, prefix)
        if kind == "norm":
            fold_smoothing(prod, linears, s, name=where(producer))
        else:
            fold_smoothing_linear(prod, linears, s, col_index, name=where(producer))
        report["scales"][producer] = {"ratio": errors.index(min(errors)) / grid if errors else 0.0, "errors": errors}
    if clip:
        to_clip = [n for n in names.linears if n not in names.no_clip]
        feats = capture_linear_inputs(layer, to_clip, block_inputs, layer_kwargs, prefix)
        for n in to_clip:
            ratios = clip_search(get_submodule(layer, n, prefix), feats[n], bits, group_size, symmetric, grid, name=where(n))
            report["clip"][n] = ratios.mean().item()
    return report
