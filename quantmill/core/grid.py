"""The two grids a weight or an input can be rounded onto: signed integers and fp8 e4m3.

One small interface (the idea of gpt-fast's grid handed to the solver), so RTN, the GPTQ solver,
QuantLinear and the checkpoint reader never ask "int or fp8?":

- `qparams(x_min, x_max)`: the scale and zero point that map a range (per channel, group, token:
  any shape) onto the grid.
- `round(x, scale, zero_point)`: x on the grid (int32 integers, or float8_e4m3fn values).
- `dequantize(q, scale, zero_point)`: back to float32, `(q - zero_point) * scale` for both grids
  (e4m3's zero point is 0, and q - 0 is q exactly, so the one formula serves both).
- `fake_quantize(x, scale, zero_point)`: round then dequantize, in x's dtype.

Integers follow compressed-tensors' conventions (so saved checkpoints decode identically): q in
[-2^(b-1), 2^(b-1) - 1], x ~ (q - zero_point) * scale. Symmetric: zero_point 0, scale absmax /
qmax (0.3 -> 38 -> 0.2992 at absmax 1, 8 bits), or with `full_range` absmax / ((qmax - qmin) / 2):
absmax / 7.5 at 4 bits, the rule of compressed-tensors' `calculate_qparams`, llm-compressor and
torchao, so -absmax lands on -8 and +absmax on 7 (7.5 rounds to 8, clamped): all 16 levels used.
Asymmetric: [min(x, 0), max(x, 0)] onto the full grid with an integer zero point. Rounding is
torch.round (half to even) then clamp, as compressed-tensors' forward does.

e4m3: symmetric, scale absmax / 448, q = e4m3(x / scale) saturating at +-448 (the cast itself
would give nan).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


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


def nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    """A zero scale (an all-zero channel, which any scale quantizes exactly) becomes 1, so
    dividing by it is harmless."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Grid values back to float32: (q - zero_point) * scale, for either grid."""
    return (q.float() - zero_point.float()) * scale


class Grid(ABC):
    """What rounds a tensor onto a grid and back; see the module docstring."""

    bits: int
    dtype: torch.dtype  # how a quantized weight stores its grid values

    @abstractmethod
    def qparams(self, x_min: torch.Tensor, x_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int32) of the ranges [x_min, x_max], elementwise."""

    @abstractmethod
    def round(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """x onto the grid: the stored values (int32, or float8_e4m3fn)."""

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        return dequantize(q, scale, zero_point)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """round then dequantize, in x's dtype: what the quantized model computes, in float."""
        return self.dequantize(self.round(x, scale, zero_point), scale, zero_point).to(x.dtype)


@dataclass(frozen=True)
class IntGrid(Grid):
    """Signed `bits`-bit integers; `full_range` (symmetric only): scale absmax / ((qmax - qmin) / 2)."""

    bits: int
    symmetric: bool = True
    full_range: bool = False

    @classmethod
    def for_weights(cls, bits: int, symmetric: bool) -> IntGrid:
        """The weight grid: full range where `weight_full_range` says so (below 8 bits)."""
        return cls(bits, symmetric, weight_full_range(bits))

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return torch.int8 if self.bits <= 8 else torch.int32

    def qparams(self, x_min: torch.Tensor, x_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map [x_min, x_max] (widened to include 0) onto the grid: absmax / qmax (activations,
        as QuantLinear and vLLM's int8 kernels compute them at run time), with `full_range`
        absmax / ((qmax - qmin) / 2); asymmetric with an integer zero point."""
        qmin, qmax = int_range(self.bits)
        x_min = torch.minimum(x_min.float(), torch.zeros_like(x_min, dtype=torch.float32))
        x_max = torch.maximum(x_max.float(), torch.zeros_like(x_max, dtype=torch.float32))
        if self.symmetric:
            scale = torch.maximum(x_min.abs(), x_max) / ((qmax - qmin) / 2 if self.full_range else qmax)
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        else:
            scale = nonzero_scale((x_max - x_min) / (qmax - qmin))
            zero_point = (qmin - torch.round(x_min / scale)).clamp(qmin, qmax).to(torch.int32)
        return nonzero_scale(scale), zero_point

    def round(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        qmin, qmax = int_range(self.bits)
        return (torch.round(x / scale) + zero_point).clamp(qmin, qmax).to(torch.int32)


@dataclass(frozen=True)
class E4M3Grid(Grid):
    """fp8 e4m3 (float8_e4m3fn): symmetric, scale absmax / 448, zero point 0."""

    bits: int = 8
    dtype: torch.dtype = FP8_DTYPE

    def qparams(self, x_min: torch.Tensor, x_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """absmax / 448, in float32; a float64 range (a static input range from the observers'
        Python floats) is divided in float64 first, as it always was, then rounded to float32."""
        absmax = torch.maximum(x_min.abs(), x_max.abs())
        absmax = absmax if absmax.dtype == torch.float64 else absmax.float()
        scale = nonzero_scale((absmax / FP8_MAX).float())
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def round(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
        """x / scale rounded to e4m3 (saturating at +-448); there is no zero point."""
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


E4M3 = E4M3Grid()


def weight_grid(kind: str, bits: int, symmetric: bool) -> Grid:
    """The grid of a weight scheme: kind "int" (IntGrid.for_weights), or "fp8" / "float" (e4m3;
    recipes say `type: float`, modules and the solver `fp8`)."""
    if kind == "int":
        return IntGrid.for_weights(bits, symmetric)
    if kind in ("fp8", "float"):
        if bits != 8 or not symmetric:
            raise ValueError(f"e4m3 weights are 8-bit and symmetric, got bits {bits}, symmetric {symmetric}")
        return E4M3
    raise ValueError(f"unknown weight grid {kind!r}: 'int', or 'fp8' / 'float' (e4m3)")
