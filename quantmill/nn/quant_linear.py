"""QuantLinear: a Linear whose weights (and optionally inputs) live on an int8 or fp8 grid.

Two ways to run the same numbers:
- "fake": the reference. Dequantize the weights, fake-quantize the input, F.linear in float32.
- "int": the real low-precision product where torch has one. int8 x int8 -> int32 with
  torch._int_mm on CUDA (an exact float64 product on the CPU, where it is faster), then
  rescaled by s_x * s_w; fp8 e4m3 x e4m3 with torch._scaled_mm (CUDA with compute capability
  >= 8.9, or a CPU build that has it).
Both agree to float32 rounding: the int8 accumulation is exact (int32), the fake one is not.

Activation schemes: "none" (weight-only), "dynamic" (a scale per token, computed at run time:
int8 absmax/127, fp8 absmax/448) and "static" (one per-tensor scale and zero point from an
observer's calibrated range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantmill.core.errors import RecipeError
from quantmill.core.grid import E4M3, FP8_DTYPE, Grid, IntGrid, int_range, weight_grid
from quantmill.core.qparams import QuantizedWeight, quantize_weight_rtn

_WEIGHT_TYPES = ("int", "fp8")
_GRANULARITIES = ("tensor", "channel", "group")
_ACT_MODES = ("none", "dynamic", "static")
_PATHS = ("fake", "int")


@dataclass(frozen=True)
class QuantScheme:
    """How one Linear is quantized (the per-module slice of a recipe)."""

    weight_type: str = "int"  # "int" | "fp8" (e4m3)
    weight_bits: int = 8
    weight_symmetric: bool = True
    granularity: str = "channel"  # "tensor" | "channel" | "group"
    group_size: int | None = None
    act: str = "none"  # "none" (weight-only) | "dynamic" (per token) | "static" (per tensor)
    act_type: str = "int"  # "int" | "fp8" (e4m3)
    act_bits: int = 8
    act_symmetric: bool = True

    def validate(self, in_features: int | None = None) -> None:
        """RecipeError naming the first field that no kernel or grid here supports."""
        if self.weight_type not in _WEIGHT_TYPES:
            raise RecipeError(f"weight type must be one of {_WEIGHT_TYPES}, got {self.weight_type!r}")
        if self.granularity not in _GRANULARITIES:
            raise RecipeError(f"weight granularity must be one of {_GRANULARITIES}, got {self.granularity!r}")
        if self.weight_type == "int" and not (isinstance(self.weight_bits, int) and 2 <= self.weight_bits <= 8):
            raise RecipeError(f"int weight bits must be in [2, 8], got {self.weight_bits!r}")
        if self.weight_type == "fp8":
            if self.weight_bits != 8:
                raise RecipeError(f"fp8 weights are 8 bits, got weight bits {self.weight_bits!r}")
            if not self.weight_symmetric:
                raise RecipeError("fp8 weights are symmetric; weight_symmetric must be true")
            if self.granularity == "group":
                raise RecipeError("fp8 weights support tensor or channel granularity, not group")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise RecipeError(f"group granularity needs a positive group_size, got {self.group_size!r}")
            if in_features is not None and in_features % self.group_size:
                raise RecipeError(f"group_size {self.group_size} does not divide in_features {in_features}")
        if self.act not in _ACT_MODES:
            raise RecipeError(f"activation scheme must be one of {_ACT_MODES}, got {self.act!r}")
        if self.act == "none":
            return
        if self.act_type not in _WEIGHT_TYPES:
            raise RecipeError(f"activation type must be one of {_WEIGHT_TYPES}, got {self.act_type!r}")
        if self.act_bits != 8:
            raise RecipeError(f"activation bits must be 8 for {self.act_type} activations, got {self.act_bits!r}")
        if self.act_type == "fp8" and not self.act_symmetric:
            raise RecipeError("fp8 activations are symmetric; act_symmetric must be true")

    def weight_grid(self) -> Grid:
        """The weights' grid: integers (full range below 8 bits, as RTN) or e4m3."""
        return weight_grid(self.weight_type, self.weight_bits, self.weight_symmetric)

    def input_grid(self) -> Grid:
        """The inputs' grid: integers with scale absmax / qmax (vLLM's int8 kernels) or e4m3."""
        return E4M3 if self.act_type == "fp8" else IntGrid(self.act_bits, self.act_symmetric)


# --------------------------------------------------------------------------- kernels


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


INT8_BACKENDS = ("auto", "int_mm", "emulate")


def int8_matmul(a: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """a [m, k] int8 @ w[n, k].T int8 -> int32 [m, n], exact.

    "int_mm": torch._int_mm. On CUDA (cuBLASLt) it needs m > 16 and k, n multiples of 8 with the
    second operand column-major, so we zero-pad (zeros add nothing to the sums).
    "emulate": a float64 product of the integers, exact while k * 128 * 128 < 2^53.
    "auto": emulate on the CPU (torch 2.13's CPU _int_mm measured ~15x slower than the float64
    product on a 512 x 576 x 1536 product, same result), elsewhere int_mm, falling back to
    emulate where the kernel refuses the shape or device.
    """
    if backend not in INT8_BACKENDS:
        raise ValueError(f"unknown int8 matmul backend {backend!r}; known: {INT8_BACKENDS}")
    if backend == "int_mm" or (backend == "auto" and a.device.type != "cpu"):
        m, k = a.shape
        n = w.shape[0]
        if a.is_cuda:
            mp, kp, np_ = max(m, 17), _round_up(k, 8), _round_up(n, 8)
            a_p, w_p = _pad_to(a, mp, kp), _pad_to(w, np_, kp)
        else:
            a_p, w_p = a, w
        try:
            return torch._int_mm(a_p.contiguous(), w_p.contiguous().t())[:m, :n]
        except (RuntimeError, NotImplementedError):
            if backend == "int_mm":
                raise
    return (a.double() @ w.double().t()).to(torch.int32)


_SCALED_MM_OK: dict[str, bool] = {}


def fp8_matmul_available(device: torch.device | str) -> bool:
    """Whether torch._scaled_mm runs fp8 e4m3 products on this device (probed once per type)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.get_device_capability(device) < (8, 9):
            return False
    elif device.type != "cpu":
        return False
    key = str(device)
    if key not in _SCALED_MM_OK:
        try:
            a = torch.ones(16, 16, device=device).to(FP8_DTYPE)
            one = torch.ones((), device=device)
            out = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            _SCALED_MM_OK[key] = bool(out[0, 0] == 16)
        except (RuntimeError, NotImplementedError, AttributeError):
            _SCALED_MM_OK[key] = False
    return _SCALED_MM_OK[key]


def fp8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [m, k] e4m3 @ w[n, k].T e4m3 -> float32 [m, n] with unit scales (we rescale after).

    cuBLASLt wants k and n multiples of 16 and a column-major second operand: zero-pad.
    """
    m, k = a.shape
    n = w.shape[0]
    if a.is_cuda:
        kp, np_ = _round_up(k, 16), _round_up(n, 16)
        a = _pad_to(a.view(torch.uint8), m, kp).view(FP8_DTYPE)
        w = _pad_to(w.view(torch.uint8), np_, kp).view(FP8_DTYPE)
    one = torch.ones((), device=a.device)
    out = torch._scaled_mm(a.contiguous(), w.contiguous().t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return out[:m, :n]


# --------------------------------------------------------------------------- the module


class QuantLinear(nn.Module):
    """A Linear with quantized weights and optionally quantized inputs; see the module docstring.

    Buffers: weight_q (int8 or float8_e4m3fn [out, in]), weight_scale (float32 [out, 1] or
    [out, in // group_size]), weight_zero_point (int32, same shape), bias (float32 or None), and
    for static activations input_scale / input_zero_point (float32 / int32 scalars).
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = True) -> None:
        super().__init__()
        scheme.validate(in_features)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        wdtype = FP8_DTYPE if scheme.weight_type == "fp8" else torch.int8
        groups = in_features // scheme.group_size if scheme.granularity == "group" and scheme.group_size else 1
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=wdtype))
        self.register_buffer("weight_scale", torch.ones(out_features, groups))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if scheme.act == "static":
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        else:
            self.input_scale = None
            self.input_zero_point = None
        self.path = "fake"

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scheme: QuantScheme,
        act_range: tuple[float, float] | None = None,
        path: str | None = None,
    ) -> QuantLinear:
        """Quantize a float Linear's weights (round-to-nearest) and, for static inputs, set the
        input scale from an observer's range (lo, hi). path None picks "int" where supported."""
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None)
        module.to(w.device)
        qw = quantize_weight_rtn(w, scheme.weight_grid(), scheme.granularity, scheme.group_size)
        module.weight_q.copy_(qw.q)
        module.weight_scale.copy_(qw.scale)
        module.weight_zero_point.copy_(qw.zero_point)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        if scheme.act == "static":
            if act_range is None:
                raise RecipeError("static activation quantization needs a calibrated act_range (lo, hi)")
            lo, hi = (torch.tensor(float(v), device=w.device) for v in act_range)
            scale, zp = scheme.input_grid().qparams(lo, hi)
            module.input_scale.copy_(scale)
            module.input_zero_point.copy_(zp)
        module.path = path if path is not None else ("int" if module.int_path_supported() else "fake")
        if module.path not in _PATHS:
            raise RecipeError(f"QuantLinear path must be one of {_PATHS}, got {module.path!r}")
        if module.path == "int" and not module.int_path_supported():
            raise RecipeError(f"no integer kernel for {module.describe()} on {w.device}; use path='fake'")
        return module

    def int_path_supported(self, device: torch.device | str | None = None) -> bool:
        """An integer product needs quantized inputs and one weight scale per output channel
        (a per-group scale varies along the reduction and cannot be factored out of the sum)."""
        s = self.scheme
        if s.act == "none" or s.granularity == "group" or s.weight_type != s.act_type:
            return False
        if s.weight_type == "fp8":
            return fp8_matmul_available(device if device is not None else self.weight_q.device)
        return s.weight_bits <= 8

    def describe(self) -> str:
        s = self.scheme
        w = f"w{s.weight_type}{s.weight_bits}/{s.granularity}" + ("" if s.weight_symmetric else "/asym")
        a = "a16" if s.act == "none" else f"a{s.act_type}{s.act_bits}/{s.act}" + ("" if s.act_symmetric else "/asym")
        return f"{w} {a}"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}, path={self.path}"

    # ----------------------------------------------------------------- the numbers

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as a QuantizedWeight (the buffers themselves, not copies)."""
        s = self.scheme
        group_size = s.group_size if s.granularity == "group" else None
        return QuantizedWeight(self.weight_q, self.weight_scale, self.weight_zero_point, s.weight_bits, group_size)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]: what the integer or e4m3 weights stand for."""
        return self.quantized_weight().dequantize()

    def input_qparams(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of a [tokens, in] input: per token ([tokens, 1]) or static (scalars)."""
        if self.scheme.act == "static":
            return self.input_scale, self.input_zero_point
        return self.scheme.input_grid().qparams(x2.amin(dim=1, keepdim=True), x2.amax(dim=1, keepdim=True))

    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_q, scale, zero_point) of a [tokens, in] float input; x_q is int8 or float8_e4m3fn."""
        scale, zp = self.input_qparams(x2)
        grid = self.scheme.input_grid()
        return grid.round(x2.float(), scale, zp).to(grid.dtype), scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = self._forward_int(x2) if self.path == "int" else self._forward_fake(x2)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def fake_quantize_input(self, x2: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize_input(x2)) computed in float32: the same numbers (every intermediate
        is a small integer, exact in float32) without the int8/int32 casts, which on the CPU cost
        ~30x more than the rounding itself."""
        scale, zp = self.input_qparams(x2)
        if self.scheme.act_type == "fp8":
            return E4M3.fake_quantize(x2, scale, zp)
        # The integer grid's round + dequantize, in place: the same float32 operations in order.
        qmin, qmax = int_range(self.scheme.act_bits)
        q = torch.round(x2 / scale)
        if not self.scheme.act_symmetric:
            zp = zp.float()
            return (q + zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)
        return q.clamp_(qmin, qmax).mul_(scale)

    def _forward_fake(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.float()
        if self.scheme.act != "none":
            x2 = self.fake_quantize_input(x2)
        return F.linear(x2, self.dequantized_weight(), self.bias)

    def _forward_int(self, x2: torch.Tensor) -> torch.Tensor:
        """y = s_x s_w [ sum_k (x_q - z_x)(w_q - z_w) ] + b, the sum expanded so the kernel sees raw
        integers: x_q W_q^T - z_x rowsum(W_q) - z_w rowsum(x_q) + K z_x z_w (exact in int32)."""
        if not self.int_path_supported(x2.device):
            raise RecipeError(f"no integer kernel for {self.describe()} on {x2.device}; set path='fake'")
        x_q, x_scale, x_zp = self.quantize_input(x2.float())
        w_scale = self.weight_scale.reshape(1, -1)
        if self.scheme.weight_type == "fp8":
            acc = fp8_matmul(x_q, self.weight_q)
        else:
            acc = int8_matmul(x_q, self.weight_q)
            x_zp = x_zp.reshape(-1, 1) if x_zp.dim() else x_zp
            w_zp = self.weight_zero_point.reshape(1, -1)
            if bool((x_zp != 0).any()):
                acc = acc - x_zp * self.weight_q.sum(dim=1, dtype=torch.int32).reshape(1, -1)
            if bool((w_zp != 0).any()):
                acc = acc - w_zp * x_q.sum(dim=1, keepdim=True, dtype=torch.int32)
                acc = acc + self.in_features * x_zp * w_zp
        y = acc.float() * (x_scale * w_scale)
        return y + self.bias if self.bias is not None else y


# --------------------------------------------------------------------------- verification


def compressed_tensors_dynamic_int8(self: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    """QuantLinear.fake_quantize_input as compressed-tensors 0.20 computes dynamic int8 inputs
    (`calculate_qparams`, `_quantize`), which transformers runs: symmetric scale absmax / 127.5;
    asymmetric round(x / s + z) in float32. quantmill and vLLM's kernels use absmax / 127 and
    round(x / s) + z. Not used for quantizing: swapped in (bench/loader_agreement.py
    --compressed-tensors-grid, tests) to show that this grid is the whole loader difference."""
    if (self.scheme.act, self.scheme.act_type) != ("dynamic", "int"):
        raise ValueError(f"compressed-tensors' dynamic int8 grid does not apply to {self.describe()}")
    if self.scheme.act_symmetric:
        scale = x2.abs().amax(dim=1, keepdim=True) / 127.5
        zp = torch.zeros_like(scale)
    else:
        zero = torch.zeros(1, dtype=x2.dtype, device=x2.device)
        lo, hi = torch.minimum(x2.amin(dim=1, keepdim=True), zero), torch.maximum(x2.amax(dim=1, keepdim=True), zero)
        scale = (hi - lo) / 255
        zp = torch.round((-128 - lo / scale).clamp(-128, 127))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round((x2 / scale + zp).clamp(-128, 127)) - zp) * scale
