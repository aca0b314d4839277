"""The W8A8 / FP8 parts of a recipe: static input scales from the stats (the grids are
core/grid.py).

Dynamic inputs need nothing at quantize time: QuantLinear (and vLLM) compute one scale per token
at run time. Static inputs need one scale (and, when asymmetric, a zero point) per Linear: the
recipe's observer turns the module's ActivationStats, recorded once by the stats stage, into a
clip range (lo, hi), and the range becomes qparams exactly as in `QuantLinear.from_linear`
(the input grid's `qparams`: int8 absmax / 127 or min-max, fp8 max(|lo|, |hi|) / 448).
Switching observers never re-runs calibration.
"""

from __future__ import annotations

from typing import Any

import torch

from quantmill.core.errors import StatsError
from quantmill.core.grid import E4M3, IntGrid, int_range
from quantmill.methods.recipe import ActivationScheme, Recipe
from quantmill.solvers.observers import ActivationStats, get_observer


def range_to_qparams(act: ActivationScheme, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar (scale, zero point) of a static input range, as QuantLinear.from_linear computes them."""
    if act.type == "float":  # the range in float64, as the observers give it (see E4M3Grid.qparams)
        return E4M3.qparams(torch.tensor(float(lo), dtype=torch.float64), torch.tensor(float(hi), dtype=torch.float64))
    return IntGrid(act.bits, act.symmetric).qparams(torch.tensor(float(lo)), torch.tensor(float(hi)))


def _clipped_fraction(stats: ActivationStats, lo: float, hi: float) -> float | None:
    """Fraction of the calibration values outside [lo, hi] (from the histogram's bin centres)."""
    if stats.hist is None:
        return None
    hist = stats.hist.double().cpu()
    width = 2.0 * stats.hist_range / hist.numel()
    centers = -stats.hist_range + (torch.arange(hist.numel(), dtype=torch.float64) + 0.5) * width
    outside = (centers < lo) | (centers > hi)
    return float(hist[outside].sum() / hist.sum())


def input_rel_rmse(stats: ActivationStats, act: ActivationScheme, lo: float, hi: float, samples: int = 8) -> float | None:
    """sqrt(E[(x - Q(x))^2] / E[x^2]) of static inputs over the calibration histogram (x taken
    uniform within each bin, `samples` points per bin): rounding and clipping error together,
    relative to the signal. None without a histogram."""
    if stats.hist is None:
        return None
    hist = stats.hist.detach().to("cpu", torch.float64)
    width = 2.0 * stats.hist_range / hist.numel()
    offsets = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples
    x = -stats.hist_range + (torch.arange(hist.numel(), dtype=torch.float64)[:, None] + offsets[None, :]) * width
    scale, zero_point = range_to_qparams(act, lo, hi)
    if act.type == "float":
        xq = E4M3.round(x.float(), scale, zero_point).double() * float(scale)
    else:
        qmin, qmax = int_range(act.bits)
        zp = float(zero_point)
        xq = ((torch.round(x / float(scale)) + zp).clamp(qmin, qmax) - zp) * float(scale)
    err = ((x - xq) ** 2).mean(dim=1)
    signal = (x**2).mean(dim=1)
    return float(((err * hist).sum() / (signal * hist).sum().clamp_min(1e-300)).sqrt())


def static_input_qparams(
    recipe: Recipe, stats: dict[str, ActivationStats], names: list[str]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Per-module (input_scale, input_zero_point) of a static recipe, and a report row per module
    (observer range, calibration absmax, fraction clipped, `input_rel_rmse`). Empty for
    weight-only or dynamic recipes."""
    a = recipe.activations
    if a is None or a.dynamic:
        return {}, {}
    observer = get_observer(a.observer, **a.observer_options)
    missing = [n for n in names if n not in stats]
    if missing:
        raise StatsError(
            f"recipe {recipe.name}: static activations need the input stats of every quantized Linear; "
            f"the stats stage has none for {len(missing)} of them ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})"
        )
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rows: dict[str, dict[str, Any]] = {}
    done: dict[int, tuple[float, float]] = {}  # q/k/v (gate/up) share one stats object: one range
    for name in names:
        s = stats[name]
        if id(s) not in done:
            try:
                done[id(s)] = observer.range(s, a.bits, a.symmetric)
            except StatsError as err:
                raise StatsError(f"recipe {recipe.name}: observer {a.observer!r} on {name}: {err}") from None
        lo, hi = done[id(s)]
        qparams[name] = range_to_qparams(a, lo, hi)
        row: dict[str, Any] = {
            "act_lo": lo,
            "act_hi": hi,
            "act_absmax": float(s.absmax.max()),
            "act_clipped_fraction": _clipped_fraction(s, lo, hi),
        }
        row["act_rel_rmse"] = input_rel_rmse(s, a, lo, hi)
        rows[name] = row
    return qparams, rows
