"""Integer quantization grids: scales, zero points, quantize and dequantize.

Conventions (the same as compressed-tensors, so saved checkpoints decode identically):
signed integers q in [-2^(b-1), 2^(b-1) - 1]; x ~ (q - zero_point) * scale.
Symmetric: zero_point = 0 and scale = absmax / (2^(b-1) - 1) (0.3 -> 38 -> 0.2992 at absmax 1, 8 bits),
or, for weights (`full_range`), absmax / ((qmax - qmin) / 2): absmax / 7.5 at 4 bits, the rule of
compressed-tensors' `calculate_qparams`, llm-compressor and torchao, so -absmax lands on -8 and
+absmax on 7 (7.5 rounds to 8, clamped): all 16 levels are used instead of 15.
Asymmetric: the range [min(x, 0), max(x, 0)] maps onto the full grid with an integer zero point.
Rounding is torch.round (half to even) then clamp, as compressed-tensors' forward does.

Optional clipping search (`search_clip_qparams`): per channel / group, the range shrunk by the
ratio r in a grid over [min_ratio, 1] whose de-quantized weights have the smallest error
sum_j imp_j (w_j - Q(w_j))^2, imp_j the importance of input j (a Hessian diagonal or the inputs'
mean square; all ones without one): llm-compressor's MSE observer does the unweighted version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def int_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed integer of `bits` bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_full_range(bits: int) -> bool:
    """Whether symmetric weights of `bits` bits use the full grid (scale absmax / ((qmax - qmin) / 2)).

    Below 8 bits they do: the 16th level is 1/16 of the int4 grid (issue 21, docs/BENCHMARKS.md).
    8-bit weights keep absmax / 127: one level in 256 is worth little (W8 RTN's held-out KL
    already equals llm-compressor's, which uses absmax / 127.5), and the W8A8 int8 matmul path's
    and SmoothQuant's tests fail with the full grid (they are pinned to the symmetric int8 grid).
    """
    return bits < 8


def compute_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool, full_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [x_min, x_max] (widened to include 0) onto the grid.

    full_range (symmetric only): absmax / ((qmax - qmin) / 2), every level used (weights);
    otherwise absmax / qmax, the grid symmetric about 0 (activations, as QuantLinear and vLLM's
    int8 kernels compute them at run time).
    """
    qmin, qmax = int_range(bits)
    x_min = torch.minimum(x_min.float(), torch.zeros_like(x_min, dtype=torch.float32))
    x_max = torch.maximum(x_max.float(), torch.zeros_like(x_max, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(x_min.abs(), x_max) / ((qmax - qmin) / 2 if full_range else qmax)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (x_max - x_min) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_point = (qmin - torch.round(x_min / scale)).clamp(qmin, qmax).to(torch.int32)
    # An all-zero channel quantizes exactly with any scale; 1.0 avoids dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Round x onto the integer grid (int32 result, values within the signed `bits` range)."""
    qmin, qmax = int_range(bits)
    return (torch.round(x / scale) + zero_point).clamp(qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Map integers back to real values."""
    return (q.float() - zero_point.float()) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """quantize then dequantize, in x's dtype: what the integer model computes, in float."""
    return dequantize(quantize(x, scale, zero_point, bits), scale, zero_point).to(x.dtype)


@dataclass
class QuantizedWeight:
    """An integer weight and what turns it back into floats.

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
            return (self.q.float() - self.zero_point[:, groups].float()) * self.scale[:, groups]
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
    wg: torch.Tensor,
    bits: int,
    symmetric: bool,
    search: ClipSearch,
    importance: torch.Tensor | None = None,
    full_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of the groups wg [rows, groups, size] (a channel is one group of
    all inputs) with each group's range shrunk by the ratio of `search` that minimises
    sum_j importance[g, j] (w_j - Q(w_j))^2. importance [groups, size] (>= 0) or None (ones).
    Ratio 1 (plain min-max) is tried first and kept on ties, so the error never exceeds it."""
    wg = wg.float()
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    imp = None if importance is None else importance.float().to(wg.device).clamp_min(0).unsqueeze(0)
    qmin, qmax = int_range(bits)
    best_err = best_scale = best_zp = None
    for r in search.ratios():
        scale, zp = compute_qparams(lo * r, hi * r, bits, symmetric, full_range)
        s, z = scale.unsqueeze(-1), zp.unsqueeze(-1).float()
        # dequantize(quantize(wg)) - wg in one buffer: the same float32 operations in the same
        # order as `quantize` and `dequantize` (the int32 round trip of integers in range is exact),
        # so the same bits, without ten temporaries the size of the weight per ratio.
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


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None = None,
    clip: ClipSearch | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor, per-output-channel or per-group scales of a [out, in] weight from its min/max
    (symmetric: the full grid, `weight_full_range`); with `clip`, each channel's / group's range
    shrunk by the searched ratio (importance [in]: the per-input weight of the error)."""
    w = w.float()
    full = weight_full_range(bits)
    if granularity == "tensor":
        scale, zp = compute_qparams(w.min().reshape(1, 1), w.max().reshape(1, 1), bits, symmetric, full)
        return scale.expand(w.shape[0], 1).clone(), zp.expand(w.shape[0], 1).clone()
    if granularity == "channel":
        if clip is not None:
            imp = None if importance is None else importance.reshape(1, -1)
            return search_clip_qparams(w.unsqueeze(1), bits, symmetric, clip, imp, full)
        return compute_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), bits, symmetric, full)
    if granularity == "group":
        assert group_size is not None and w.shape[1] % group_size == 0
        wg = w.reshape(w.shape[0], -1, group_size)
        if clip is not None:
            imp = None if importance is None else importance.reshape(-1, group_size)
            return search_clip_qparams(wg, bits, symmetric, clip, imp, full)
        return compute_qparams(wg.amin(dim=2), wg.amax(dim=2), bits, symmetric, full)
    raise ValueError(f"unknown granularity {granularity!r}")


def quantize_weight_rtn(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str,
    group_size: int | None = None,
    clip: ClipSearch | None = None,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest: each weight independently to the nearest grid point of its scale."""
    scale, zp = weight_qparams(w, bits, symmetric, granularity, group_size, clip, importance)
    w = w.float()
    if granularity == "group":
        wg = w.reshape(w.shape[0], -1, group_size)
        q = quantize(wg, scale.unsqueeze(-1), zp.unsqueeze(-1), bits).reshape(w.shape)
        return QuantizedWeight(q, scale, zp, bits, group_size)
    return QuantizedWeight(quantize(w, scale, zp, bits), scale, zp, bits)
