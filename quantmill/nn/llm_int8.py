"""LLM.int8() (Dettmers et al. 2022): int8 matmul with a float side path for outlier features.

Y = X W^T is split by input column j. Columns where some token has |X_ij| >= threshold (6.0 in
the paper) are "outlier features": they go through a float matmul. The rest go through an
int8 x int8 -> int32 matmul with vector-wise scales: per-token absmax / 127 for X, per-output-row
absmax / 127 for W. The two partial outputs add up.

zero_point=True quantizes the int8 part's inputs per token with a zero point instead ([min, max]
of the token's remaining columns onto the 256 levels): the paper's "zeropoint vector-wise +
decomposition" (Table 1), its most accurate variant; absmax is what bitsandbytes ships. The
product stays integer: s_x s_w (X_q W_q^T - z_x rowsum(W_q)), exact in int32.

Only the int8 weight is stored (that is the memory saving). Like bitsandbytes, the outlier
columns use the de-quantized int8 weight columns W_deq[:, j] = q[:, j] * scale, not the original
float weight. Consequences, both tested:
  threshold = inf -> no outlier column: plain int8 W8A8 with per-token activation scales;
  threshold = 0   -> every column is an outlier (|x| >= 0 always): Y = F.linear(X, W_deq, b),
                     the float layer up to the int8 rounding of W alone.
Recipes must use a threshold > 0 (`validate_threshold`); the module also accepts 0 for that test.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from quantmill.core.errors import RecipeError
from quantmill.core.grid import IntGrid
from quantmill.core.qparams import compute_qparams, quantize, quantize_weight_rtn
from quantmill.nn.quant_linear import int8_matmul

DEFAULT_THRESHOLD = 6.0


def inputs_label(zero_point: bool) -> str:
    """How the int8 part's inputs are quantized, as reports and checkpoints name it."""
    return "zeropoint" if zero_point else "absmax"


def validate_threshold(threshold: float) -> float:
    """A recipe's outlier threshold: a number > 0 (inf allowed: no decomposition, plain W8A8)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold <= 0:
        raise RecipeError(f"llm_int8 threshold must be a number > 0, got {threshold!r}")
    return float(threshold)


class LLMInt8Linear(nn.Module):
    """A Linear stored as int8 weights + per-row scales, computed with LLM.int8() decomposition.

    state_dict: weight (int8 [out, in]), weight_scale (float32 [out, 1]), bias (if any), threshold.
    outlier_fraction: share of input columns taken out in the last forward;
    mean_outlier_fraction: the same over all forwards since `reset_stats` (for the report).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, threshold: float = DEFAULT_THRESHOLD,
        backend: str = "auto", zero_point: bool = False,
    ):
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
            raise RecipeError(f"llm_int8 threshold must be a number >= 0, got {threshold!r}")
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("input_zero_point", torch.tensor(bool(zero_point)))  # saved with the checkpoint
        self.reset_stats()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD, backend: str = "auto", zero_point: bool = False
    ) -> LLMInt8Linear:
        """Quantize a float Linear: W -> int8 per output row with scale absmax / 127."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, backend, zero_point)
        qw = quantize_weight_rtn(linear.weight.detach(), IntGrid.for_weights(8, True), "channel")
        m.weight.copy_(qw.q.to(torch.int8))
        m.weight_scale.copy_(qw.scale.float())
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m.to(linear.weight.device)

    def reset_stats(self) -> None:
        self.outlier_fraction = 0.0
        self.outlier_columns: torch.Tensor | None = None
        self._outlier_cols_seen = 0
        self._cols_seen = 0

    @property
    def mean_outlier_fraction(self) -> float:
        return self._outlier_cols_seen / self._cols_seen if self._cols_seen else 0.0

    def dequantized_weight(self) -> torch.Tensor:
        """W_deq = q * scale (float32), what the outlier path multiplies by."""
        return self.weight.float() * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        X = x.reshape(-1, self.in_features).float()
        outliers = (X.abs() >= self.threshold).any(dim=0)  # [in]: any token of this input
        n_out = int(outliers.sum())
        self.outlier_fraction = n_out / self.in_features
        self.outlier_columns = outliers.nonzero().flatten()
        self._outlier_cols_seen += n_out
        self._cols_seen += self.in_features

        # int8 part: outlier columns zeroed, per-token scales over the remaining columns (a zeroed
        # column quantizes to exactly the zero point, so it adds nothing either way).
        X_r = X.masked_fill(outliers[None, :], 0.0)
        zero_point = bool(self.input_zero_point)
        if zero_point:
            s_x, zp = compute_qparams(X_r.amin(dim=1, keepdim=True), X_r.amax(dim=1, keepdim=True), 8, False)
        else:
            absmax = X_r.abs().amax(dim=1, keepdim=True)
            s_x, zp = compute_qparams(-absmax, absmax, 8, True)
        X_q = quantize(X_r, s_x, zp, 8).to(torch.int8)
        acc = int8_matmul(X_q, self.weight, self.backend)  # [T, out] int32
        if zero_point:
            acc = acc - zp * self.weight.sum(dim=1, dtype=torch.int32)[None, :]
        Y = acc.float() * s_x * self.weight_scale.t()

        # float part: outlier columns of X with the de-quantized int8 weight columns.
        if n_out:
            idx = self.outlier_columns
            Y = Y + X[:, idx] @ self.dequantized_weight()[:, idx].t()
        if self.bias is not None:
            Y = Y + self.bias.float()
        return Y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold.item()}, "
            f"inputs={inputs_label(bool(self.input_zero_point))}"
        )


def convert_linears(
    module: nn.Module, threshold: float = DEFAULT_THRESHOLD, skip: tuple[str, ...] = ("lm_head",), zero_point: bool = False
) -> list[str]:
    """Replace every nn.Linear under `module` (names ending in a `skip` entry excepted) in place.

    Returns the replaced names. The threshold is validated as a recipe's (> 0).
    """
    threshold = validate_threshold(threshold)
    names = [
        n for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and n and not any(n == s or n.endswith("." + s) for s in skip)
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, LLMInt8Linear.from_linear(getattr(owner, child), threshold, zero_point=zero_point))
    return names
