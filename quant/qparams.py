"""Integer quantization grids: scales, zero points, quantize and dequantize.

Conventions (the same as compressed-tensors, so saved checkpoints decode identically):
signed integers q in [-2^(b-1), 2^(b-1) - 1]; x ~ (q - zero_point) * scale.
Symmetric: zero_point = 0 and scale = absmax / (2^(b-1) - 1) (0.3 -> 38 -> 0.2992 at absmax 1, 8 bits).
Asymmetric: the range [min(x, 0), max(x, 0)] maps onto the full grid with an integer zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def int_range(bits: int) -> tuple[int, int]:
    """Smallest and largest signed integer of `bits` bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def compute_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [x_min, x_max] (widened to include 0) onto the grid."""
    qmin, qmax = int_range(bits)
    x_min = torch.minimum(x_min.float(), torch.zeros_like(x_min, dtype=torch.float32))
    x_max = torch.maximum(x_max.float(), torch.zeros_like(x_max, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(x_min.abs(), x_max) / qmax
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


def weight_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, granularity: str, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor, per-output-channel or per-group scales of a [out, in] weight from its min/max."""
    w = w.float()
    if granularity == "tensor":
        scale, zp = compute_qparams(w.min().reshape(1, 1), w.max().reshape(1, 1), bits, symmetric)
        return scale.expand(w.shape[0], 1).clone(), zp.expand(w.shape[0], 1).clone()
    if granularity == "channel":
        return compute_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), bits, symmetric)
    if granularity == "group":
        assert group_size is not None and w.shape[1] % group_size == 0
        wg = w.reshape(w.shape[0], -1, group_size)
        return compute_qparams(wg.amin(dim=2), wg.amax(dim=2), bits, symmetric)
    raise ValueError(f"unknown granularity {granularity!r}")


def quantize_weight_rtn(
    w: torch.Tensor, bits: int, symmetric: bool, granularity: str, group_size: int | None = None
) -> QuantizedWeight:
    """Round-to-nearest: each weight independently to the nearest grid point of its scale."""
    scale, zp = weight_qparams(w, bits, symmetric, granularity, group_size)
    w = w.float()
    if granularity == "group":
        wg = w.reshape(w.shape[0], -1, group_size)
        q = quantize(wg, scale.unsqueeze(-1), zp.unsqueeze(-1), bits).reshape(w.shape)
        return QuantizedWeight(q, scale, zp, bits, group_size)
    return QuantizedWeight(quantize(w, scale, zp, bits), scale, zp, bits)
