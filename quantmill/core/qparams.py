"""Weights on a grid: `QuantizedWeight`, round-to-nearest per tensor / channel / group, and the
clipping-ratio search; the grids themselves (int and e4m3) are `quantmill.core.grid`.

Optional clipping search (`search_clip_qparams`): per channel / group, the range shrunk by the
ratio r in a grid over [min_ratio, 1] whose de-quantized weights have the smallest error
sum_j imp_j (w_j - Q(w_j))^2, imp_j the importance of input j (a Hessian diagonal or the inputs'
mean square; all ones without one): llm-compressor's MSE observer does the unweighted version.

`compute_qparams`, `quantize` and `fake_quantize` are the integer grid's methods in the form the
activation code (observers, SmoothQuant, LLM.int8()) holds its numbers: bits and symmetry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantmill.core.grid import Grid, IntGrid, dequantize, int_range

__all__ = [
    "ClipSearch", "QuantizedWeight", "compute_qparams", "dequantize", "fake_quantize", "group_qparams",
    "int_range", "quantize", "quantize_weight_rtn", "search_clip_qparams", "weight_groups",
]


def compute_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`IntGrid(bits, symmetric, full_range).qparams(x_min, x_max)`."""
    return IntGrid(bits, symmetric, full_range).qparams(x_min, x_max)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """`IntGrid(bits).round`: x onto the integer grid (int32, within the signed `bits` range)."""
    return IntGrid(bits).round(x, scale, zero_point)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """`IntGrid(bits).fake_quantize`: quantize then dequantize, in x's dtype."""
    return IntGrid(bits).fake_quantize(x, scale, zero_point)


@dataclass
class QuantizedWeight:
    """A weight on a grid (integers, or e4m3 values with zero points 0) and what turns it back
    into floats: `dequantize`, the one formula of `quantmill.core.grid`.

    scale / zero_point have shape [out, 1] (tensor and channel: the tensor case repeats one value)
    or [out, in // group_size] (group).
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    group_size: int | None = None
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Integers of <= 8 bits are held as int8: an int32 copy of every weight of a model would
        # cost as much host memory as the float model itself (measured: +424 MB on demo).
        if not self.q.dtype.is_floating_point and self.q.dtype != torch.int8 and self.bits <= 8:
            self.q = self.q.to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        if self.g_idx is not None:
            groups = self.g_idx.long()
            return dequantize(self.q, self.scale[:, groups], self.zero_point[:, groups])
        if self.group_size is None:
            return dequantize(self.q, self.scale, self.zero_point)
        out, inp = self.q.shape
        g = self.group_size
        q = self.q.reshape(out, inp // g, g)
        return dequantize(q, self.scale.unsqueeze(-1), self.zero_point.unsqueeze(-1)).reshape(out, inp)


@dataclass(frozen=True)
class ClipSearch:
    """The clipping-ratio search of weight ranges: `grid` + 1 ratios from 1 down to `min_ratio`."""

    grid: int = 20
    min_ratio: float = 0.8

    def ratios(self) -> list[float]:
        return [1.0 - i * (1.0 - self.min_ratio) / self.grid for i in range(self.grid + 1)]


def search_clip_qparams(
    wg: torch.Tensor, grid: IntGrid, search: ClipSearch, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of the groups wg [rows, groups, size] (a channel is one group of
    all inputs) with each group's range shrunk by the ratio of `search` that minimises
    sum_j importance[g, j] (w_j - Q(w_j))^2. importance [groups, size] (>= 0) or None (ones).
    Ratio 1 (plain min-max) is tried first and kept on ties, so the error never exceeds it."""
    if not isinstance(grid, IntGrid):
        raise ValueError(f"the clip search is for integer grids, not {grid}")
    wg = wg.float()
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    imp = None if importance is None else importance.float().to(wg.device).clamp_min(0).unsqueeze(0)
    qmin, qmax = int_range(grid.bits)
    best_err = best_scale = best_zp = None
    for r in search.ratios():
        scale, zp = grid.qparams(lo * r, hi * r)
        s, z = scale.unsqueeze(-1), zp.unsqueeze(-1).float()
        # dequantize(round(wg)) - wg in one buffer: the same float32 operations in the same
        # order as `IntGrid.round` and `dequantize` (the int32 round trip of integers in range is
        # exact), so the same bits, without ten temporaries the size of the weight per ratio.
        d2 = (wg / s).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(wg).square_()
        err = (d2.mul_(imp) if imp is not None else d2).sum(dim=2)
        if best_err is None:
            best_err, best_scale, best_zp = err, scale, zp
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def weight_groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """w [out, in] as [out, groups, size]: groups of `group_size` inputs, or (None) one group of
    all inputs per output channel."""
    size = w.shape[1] if group_size is None else group_size
    if w.shape[1] % size:
        raise ValueError(f"group size {size} does not divide the {w.shape[1]} input columns")
    return w.reshape(w.shape[0], -1, size)


def group_qparams(
    wg: torch.Tensor, grid: Grid, clip: ClipSearch | None = None, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, groups] scales and zero points of the groups wg [rows, groups, size]: from each
    group's min / max, or with `clip` from the searched ratio (importance [groups, size]: the
    per-input weight of the error)."""
    if clip is None:
        return grid.qparams(wg.amin(dim=2), wg.amax(dim=2))
    return search_clip_qparams(wg, grid, clip, importance)


def quantize_weight_rtn(
    w: torch.Tensor,
    grid: Grid,
    granularity: str,
    group_size: int | None = None,
    clip: ClipSearch | None = None,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest: each weight of w [out, in] to the nearest point of its scale on `grid`,
    one scale per tensor, output channel or group of `group_size` inputs. Ranges are min / max
    (symmetric int grids: `weight_full_range`), or with `clip` per channel / group the searched
    ratio, importance [in] weighing each input's error."""
    w = w.float()
    if granularity == "tensor":
        scale, zp = grid.qparams(w.min().reshape(1, 1), w.max().reshape(1, 1))
        scale, zp = scale.expand(w.shape[0], 1).clone(), zp.expand(w.shape[0], 1).clone()
        return QuantizedWeight(grid.round(w, scale, zp), scale, zp, grid.bits)
    if granularity not in ("channel", "group"):
        raise ValueError(f"unknown granularity {granularity!r}")
    if granularity == "channel":
        group_size = None
    elif group_size is None:
        raise ValueError("group granularity needs a group_size")
    wg = weight_groups(w, group_size)
    imp = None if importance is None else importance.reshape(-1, wg.shape[2])
    scale, zp = group_qparams(wg, grid, clip, imp)
    q = grid.round(wg, scale.unsqueeze(-1), zp.unsqueeze(-1)).reshape(w.shape)
    return QuantizedWeight(q, scale, zp, grid.bits, group_size)
