"""RTN with least-squares scales: llama.cpp's `make_qx_quants`, weighted by the importance matrix.

Round-to-nearest puts each group's largest |w| on the grid's end (scale absmax / 7.5 at 4 bits).
That scale is rarely the best one for the codes it produces: for fixed codes q the weighted error

    E(s) = sum_j imp_j (w_j - s q_j)^2

is a parabola in s whose minimum is the least-squares scale s* = sum imp w q / sum imp q^2, with
E(s*) = sum imp w^2 - (sum imp w q)^2 / sum imp q^2. llama.cpp (ggml-quants.c, make_qx_quants)
tries the codes of the candidate scales absmax / (d + 0.1 k), k = -K..K, around the grid's
divisor d, keeps the candidate whose least-squares scale has the smallest error, and stores that
scale with those codes. Its importance matrix (`llama-imatrix`) is the inputs' mean square per
input channel: here the statistics stage's `mean_sq`, so the error is the layer's output error
under a diagonal input covariance. After the candidates, a few alternating steps (codes nearest
to the current scale, then that scale's least-squares refit) lower the error further, as in
Lloyd's algorithm; each step is kept only where it lowers the error.

Candidate k = 0 is plain RTN's scale, so the result is never worse than RTN's in the weighted
error (tests/test_rtn_lsq.py checks it per group). Symmetric integer weights only: the grid and
the checkpoint are RTN's (compressed-tensors pack-quantized), so every reader loads it unchanged.
"""

from __future__ import annotations

import torch
from pydantic import Field

from quantmill.core.errors import RecipeError
from quantmill.core.grid import IntGrid, int_range
from quantmill.core.qparams import QuantizedWeight, weight_groups
from quantmill.methods.base import MethodContext, MethodResult, layer_granularity, target_linears, weight_error_report
from quantmill.methods.options import MethodOptions, options_of
from quantmill.methods.recipe import Recipe


class RtnLsqOptions(MethodOptions):
    """rtn_lsq's options: how many candidate divisors either side of the grid's, and how many
    alternating code/scale refits follow."""

    method = "rtn_lsq"

    candidates: int = Field(9, ge=0, le=50, strict=True, description="an integer in 0..50")
    refits: int = Field(4, ge=0, le=50, strict=True, description="an integer in 0..50")
    weighted: bool = Field(True, strict=True, description="true or false")


def _least_squares(wg: torch.Tensor, q: torch.Tensor, imp: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale minimising sum imp (w - s q)^2 per group for the codes q, and that error.
    A group whose codes are all 0 keeps `fallback` (its error is then sum imp w^2 at any scale)."""
    wq = (imp * wg * q).sum(dim=2)
    qq = (imp * q * q).sum(dim=2)
    scale = torch.where(qq > 0, wq / qq.clamp_min(torch.finfo(qq.dtype).tiny), fallback)
    err = (imp * (wg - scale.unsqueeze(-1) * q).square()).sum(dim=2)
    return scale, err


def least_squares_qparams(wg: torch.Tensor, grid: IntGrid, imp: torch.Tensor | None, candidates: int, refits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales [rows, groups] and codes [rows, groups, size] (float, integral) of the groups
    wg [rows, groups, size] on the symmetric integer `grid`; imp [groups, size] or None (ones)."""
    wg = wg.float()
    imp = torch.ones_like(wg[:1]) if imp is None else imp.float().clamp_min(0).unsqueeze(0)
    qmin, qmax = int_range(grid.bits)
    divisor = (qmax - qmin) / 2 if grid.full_range else qmax  # RTN's: rtn_scale below is grid.qparams'
    zero = torch.zeros((), dtype=torch.int32)
    absmax = wg.abs().amax(dim=2)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero group: any scale

    def codes(scale: torch.Tensor) -> torch.Tensor:
        return grid.round(wg, scale.unsqueeze(-1), zero).float()

    rtn_scale = absmax / divisor
    best_q = codes(rtn_scale)
    best_scale, best_err = _least_squares(wg, best_q, imp, rtn_scale)
    for k in [k for i in range(1, candidates + 1) for k in (-i, i)]:
        if divisor + 0.1 * k <= 0:
            continue
        q = codes(absmax / (divisor + 0.1 * k))
        scale, err = _least_squares(wg, q, imp, rtn_scale)
        better = err < best_err
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
        best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    for _ in range(refits):
        q = codes(best_scale)
        scale, err = _least_squares(wg, q, imp, best_scale)
        better = err < best_err
        if not bool(better.any()):
            break
        best_q = torch.where(better.unsqueeze(-1), q, best_q)
        best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    return best_scale, best_q


def quantize_weight_lsq(
    w: torch.Tensor, bits: int, granularity: str, group_size: int | None, importance: torch.Tensor | None, options: RtnLsqOptions
) -> QuantizedWeight:
    """One [out, in] weight per channel (one group of all inputs) or per group of `group_size`."""
    grid = IntGrid.for_weights(bits, symmetric=True)
    group_size = group_size if granularity == "group" else None
    wg = weight_groups(w, group_size)
    imp = None if importance is None else importance.reshape(-1, wg.shape[2])
    scale, q = least_squares_qparams(wg, grid, imp, options.candidates, options.refits)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return QuantizedWeight(q.reshape(w.shape).to(torch.int32), scale, zero_point, bits, group_size)


def rtn_lsq(ctx: MethodContext) -> MethodResult:
    """Every targeted Linear on its own (no block walk): least-squares scales per channel or group,
    weighted by the stats' per-input mean square (unweighted with `weighted: false` or no stats)."""
    options = options_of(ctx.recipe, RtnLsqOptions)
    linears = target_linears(ctx.model, ctx.recipe)
    plan = layer_granularity(ctx.recipe, linears)
    weights, report = {}, []
    for name, linear in linears.items():
        granularity, group_size = plan[name]
        stats = ctx.stats.get(name) if options.weighted else None
        importance = stats.mean_sq.to(linear.weight.device) if stats is not None else None
        qw = quantize_weight_lsq(linear.weight.data, ctx.recipe.weights.bits, granularity, group_size, importance, options)
        weights[name] = qw
        report.append(weight_error_report(name, linear.weight.data, qw, ctx.stats.get(name), granularity=granularity))
    return MethodResult(weights, report)


def check_rtn_lsq(recipe: Recipe) -> None:
    """Load-time checks: symmetric integer weights per channel or group, no activation quantization."""
    w = recipe.weights
    if w.type != "int" or not w.symmetric:
        raise RecipeError("rtn_lsq quantizes symmetric integer weights (weights: type int, symmetric: true)")
    if w.granularity not in ("channel", "group"):
        raise RecipeError(f"rtn_lsq fits a scale per channel or per group, not per {w.granularity}")
    if recipe.activations is not None:
        raise RecipeError("rtn_lsq is weight-only: remove `activations` (use rtn or gptq for W8A8)")
