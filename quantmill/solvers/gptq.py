"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), written to read next to the paper and the authors' gptq.py.

Pure functions of a weight W [out, in] and a Hessian H [in, in] of the layer-wise objective
||W X - Q X||^2: no hooks, no model, no I/O. Callers accumulate H with `HessianAccumulator`
(one per Linear, fed the Linear's inputs) and call `gptq_quantize` once per layer.

The solver holds a grid (`quantmill.core.grid`: `options.grid`) and never looks inside it: it
asks for scales (`qparams`), rounds a column (`round`) and reads back its value (`dequantize`).
The integer grid is compressed-tensors' (x ~ (q - zero_point) * scale), so the result saves
exactly like an RTN weight; with act-order and dynamic groups it adds `g_idx` (compressed-tensors'
`weight_g_idx`). `weight_type="fp8"` runs the same algorithm on the e4m3 grid (per-channel scale
absmax / 448, as RTN's fp8): e4m3's 3 mantissa bits make its rounding error proportional to the
weight, which for Gaussian-like rows is larger than int8's, and the error feedback takes much of
it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantmill.core.grid import Grid, weight_grid
from quantmill.core.qparams import ClipSearch, QuantizedWeight, group_qparams, quantize_weight_rtn, weight_groups


class HessianAccumulator:
    """Running H = 2/n * sum_k x_k^T x_k over the rows x_k of every batch seen so far.

    Kept as a running mean (as in the reference: H *= n/(n+m); X *= sqrt(2/(n+m)); H += X^T X)
    so that H stays O(1) in size however many tokens are fed, and in float32 whatever the
    activations' dtype. n counts rows (tokens), not sequences.
    """

    def __init__(self, in_features: int | None = None, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.in_features = in_features
        self.n = 0
        self._H: torch.Tensor | None = None
        if in_features is not None and self.device is not None:
            self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=self.device)

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            if self.in_features is None:
                raise ValueError("HessianAccumulator has seen no batch and does not know in_features")
            self._H = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=self.device)
        return self._H

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold the rows of x [..., in] into H."""
        if self.in_features is None:
            self.in_features = x.shape[-1]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"batch has {x.shape[-1]} input features, the Hessian {self.in_features}")
        if self.device is None:
            self.device = x.device
        X = x.detach().reshape(-1, self.in_features).to(device=self.device, dtype=torch.float32)
        m = X.shape[0]
        if m == 0:
            return
        H = self.H
        H *= self.n / (self.n + m)
        self.n += m
        X = math.sqrt(2 / self.n) * X
        H += X.t() @ X


@dataclass
class GPTQOptions:
    """The solver's knobs; defaults are the reference's (per-channel, 1% dampening, block 128).

    group_size None quantizes per output channel. static_groups computes every group's
    scale once from the original weight (so act-order keeps the plain contiguous layout and
    needs no g_idx); otherwise each group's scale comes from the error-updated weights when
    the solver reaches it. max_damp_tries: how many dampenings to try (each 10x the last)
    before falling back to RTN. bits, symmetric and weight_type name the grid the solver holds
    (`grid`): integers (full range below 8 bits), or for "fp8" e4m3, symmetric, per channel.
    clip: search each channel's / group's clipping ratio (`quantmill.core.qparams.ClipSearch`), the error
    of input j weighted by 1 / [H^-1]_jj (the GPTQ loss of a lone column; diag(H) when the
    solver falls back to RTN); None: plain min-max ranges.
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None
    actorder: bool = False
    static_groups: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    max_damp_tries: int = 5
    weight_type: str = "int"  # "int" | "fp8" (e4m3)
    clip: ClipSearch | None = None

    def __post_init__(self) -> None:
        if self.weight_type not in ("int", "fp8"):
            raise ValueError(f"GPTQ weight_type must be 'int' or 'fp8', got {self.weight_type!r}")
        if self.weight_type == "fp8" and (self.bits != 8 or not self.symmetric or self.group_size is not None):
            raise ValueError("GPTQ fp8 weights are 8-bit e4m3, symmetric, one scale per output channel")
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ValueError(f"GPTQ bits must be an integer in 2..8, got {self.bits!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"GPTQ group_size must be positive or None, got {self.group_size}")
        if self.blocksize < 1:
            raise ValueError(f"GPTQ blocksize must be positive, got {self.blocksize}")
        if not (self.percdamp >= 0 and math.isfinite(self.percdamp)):
            raise ValueError(f"GPTQ percdamp must be a finite number >= 0, got {self.percdamp}")
        if self.max_damp_tries < 1:
            raise ValueError(f"GPTQ max_damp_tries must be at least 1, got {self.max_damp_tries}")
        if self.clip is not None and self.weight_type == "fp8":
            raise ValueError("GPTQ clip search is for integer weights")

    @property
    def grid(self) -> Grid:
        """The grid the solver rounds onto: integers (full range below 8 bits) or e4m3."""
        return weight_grid(self.weight_type, self.bits, self.symmetric)


@dataclass
class GPTQResult:
    """What the solver produced.

    weight.dequantize() is exactly the Q the solver used. loss is the reference's sum of
    (w - q)^2 / d^2 / 2 over all columns, which equals tr((W - Q) H_damped (W - Q)^T) / 2;
    NaN when RTN was used. damp is the dampening actually added, as a fraction of mean(diag H)
    (percdamp, or a larger one if Cholesky needed it).
    """

    weight: QuantizedWeight
    loss: float
    damp: float
    fallback_rtn: bool
    dead_columns: int


def _damp_schedule(percdamp: float, tries: int) -> list[float]:
    """percdamp first, then ten times more at each retry (from 1e-3 when percdamp is 0)."""
    base = percdamp if percdamp > 0 else 1e-3
    return [percdamp] + [base * 10**k for k in range(1, tries)]


def _cholesky_inverse_upper(H: torch.Tensor, percdamp: float, tries: int) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp until it exists.

    The rows of that factor are what the paper's Lemma uses: row i holds the OBS update of the
    columns after i once columns < i are fixed. Returns (None, nan) when no dampening helps
    (NaN/inf Hessian, or one that is not positive semi-definite).
    """
    idx = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    for rel in _damp_schedule(percdamp, tries):
        Hd = H.clone()
        Hd[idx, idx] += rel * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() != 0 or not torch.isfinite(L).all():
            continue
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info.item() != 0 or not torch.isfinite(U).all():
            continue
        return U, rel
    return None, math.nan


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, options: GPTQOptions) -> GPTQResult:
    """Quantize W [out, in] column by column, feeding each column's rounding error forward
    into the not-yet-quantized columns through H's inverse (Algorithm 1 of the paper).

    Runs on W's device in float32; H is moved there. Neither input is modified.
    """
    rows, columns = W.shape
    if H.shape != (columns, columns):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight shape {tuple(W.shape)}")
    gs = options.group_size
    if gs is not None and columns % gs != 0:
        raise ValueError(f"group size {gs} does not divide the {columns} input columns")
    grid, clip = options.grid, options.clip

    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()

    # Dead inputs (never non-zero in calibration) carry no information: any weight will do, 0 is
    # the cheapest, and a 1 on the diagonal keeps H invertible.
    dead = torch.diag(H) == 0
    dead_columns = int(dead.sum().item())
    H[dead, dead] = 1
    W[:, dead] = 0
    W_orig = W  # dead-zeroed, unpermuted: what RTN sees if we fall back

    # Act-order: quantize the columns with the largest H[i,i] (most input energy) first, while
    # many columns are still free to absorb their error.
    perm = invperm = None
    if options.actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        invperm = torch.argsort(perm)

    Hinv, damp = _cholesky_inverse_upper(H, options.percdamp, options.max_damp_tries)
    if Hinv is None:
        importance = None
        if clip is not None:
            importance = torch.diag(H)[invperm] if invperm is not None else torch.diag(H)
        weight = quantize_weight_rtn(W_orig, grid, "channel" if gs is None else "group", gs, clip, importance)
        return GPTQResult(weight, loss=math.nan, damp=math.nan, fallback_rtn=True, dead_columns=dead_columns)

    # The clip search weighs input j's error by 1 / [H^-1]_jj, Hinv's diagonal being d_j^2 in solve
    # order (the loss a lone rounding error of column j costs once the later columns absorb it).
    importance = importance_orig = None
    if clip is not None:
        importance = 1.0 / torch.diag(Hinv).square()
        importance_orig = importance[invperm] if invperm is not None else importance

    # group_of[col]: the scale column of the weight column solved at position col. Scales known
    # before the solve: per channel (one), or static groups (from the original weights, in the
    # original column order, so the saved layout stays plain). Dynamic groups: each group's scale
    # from its columns' error-updated values when the solver reaches it.
    dynamic_groups = gs is not None and not options.static_groups
    if dynamic_groups:
        scale = torch.ones(rows, columns // gs, dtype=torch.float32, device=W.device)
        zero = torch.zeros(rows, columns // gs, dtype=torch.int32, device=W.device)
        group_of = [col // gs for col in range(columns)]
    else:
        imp = None if importance_orig is None else importance_orig.reshape(-1, gs or columns)
        scale, zero = group_qparams(weight_groups(W_orig, gs), grid, clip, imp)
        order = perm.cpu() if perm is not None else torch.arange(columns)
        group_of = [0] * columns if gs is None else (order // gs).tolist()

    # With dynamic groups a group's scale is computed from its columns' current values; making
    # blocks whole groups keeps a group inside W1, where those values are up to date.
    blocksize = options.blocksize
    if dynamic_groups:
        blocksize = max(1, blocksize // gs) * gs

    # The grid values, held exactly in float32 (small integers, or e4m3 values).
    Q = torch.zeros(rows, columns, dtype=torch.float32, device=W.device)
    Losses = torch.zeros_like(W)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            col = i1 + i
            if dynamic_groups and col % gs == 0:
                g = col // gs
                imp = None if importance is None else importance[col : col + gs].unsqueeze(0)
                s_g, z_g = group_qparams(W1[:, i : i + gs].unsqueeze(1), grid, clip, imp)
                scale[:, g], zero[:, g] = s_g[:, 0], z_g[:, 0]
            s, z = scale[:, group_of[col]], zero[:, group_of[col]]
            w = W1[:, i]
            d = Hinv1[i, i]

            Q1[:, i] = grid.round(w, s, z)
            q = grid.dequantize(Q1[:, i], s, z)
            Losses1[:, i] = (w - q) ** 2 / d**2

            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Q[:, i1:i2] = Q1
        Losses[:, i1:i2] = Losses1 / 2
        # Lazy batch update: the columns after this block get the block's errors in one matmul.
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    g_idx = None
    if invperm is not None:
        Q = Q[:, invperm]
        if dynamic_groups:
            # Column j was solved at position invperm[j]; groups are runs of gs positions.
            g_idx = (invperm // gs).to(torch.int32)

    weight = QuantizedWeight(Q.to(grid.dtype), scale, zero, grid.bits, gs, g_idx)
    return GPTQResult(
        weight, loss=float(Losses.sum().item()), damp=float(damp), fallback_rtn=False, dead_columns=dead_columns
    )
