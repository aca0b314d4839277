"""The e4m3 grid: its dtype, its range and the rounding onto it.

One home for fp8 rounding, below everything that uses it: the GPTQ solver, RTN, QuantLinear and
the static input scales all round through `quantize_fp8`, so they agree bit for bit.
"""

from __future__ import annotations

import torch

from quantmill.core.qparams import QuantizedWeight

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (saturating at +-448: the cast itself would give nan)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (an all-zero row) becomes 1, so dividing by it is harmless."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_weight_fp8(w: torch.Tensor, granularity: str) -> QuantizedWeight:
    """e4m3 weights, per tensor or per output channel: scale = absmax / 448, q = e4m3(w / scale)."""
    w = w.float()
    if granularity == "tensor":
        absmax = w.abs().amax().reshape(1, 1).expand(w.shape[0], 1)
    elif granularity == "channel":
        absmax = w.abs().amax(dim=1, keepdim=True)
    else:
        raise ValueError(f"fp8 weights are per tensor or per channel, not {granularity!r}")
    scale = nonzero_scale(absmax / FP8_MAX).contiguous()
    return QuantizedWeight(quantize_fp8(w, scale), scale, torch.zeros_like(scale, dtype=torch.int32), bits=8)
