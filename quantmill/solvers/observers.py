"""Activation statistics and the observers that turn them into a quantization range.

The stats stage records, per Linear input, an `ActivationStats` (per-channel extremes, a signed
histogram of every value, per-batch extremes). An observer maps those stats to a clip range
(lo, hi) for a given bit width; `compute_qparams(lo, hi, bits, symmetric)` then gives the scale
and zero point. Observers never see the raw activations, so a recipe can change its observer
without re-running calibration.

Observers: min-max, EMA min-max (the moving average of QAT frameworks), percentile, MSE
(clip-ratio search minimising rounding + clipping error) and KL (TensorRT's entropy
calibration, Migacz 2017, "8-bit Inference with TensorRT").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from quantmill.core.errors import RecipeError, StatsError
from quantmill.core.qparams import compute_qparams, int_range

OUTLIER_THRESHOLD = 6.0
"""|x| at or above this counts as an outlier (the LLM.int8() paper's threshold)."""

DEFAULT_NBINS = 4096
_MIN_RANGE = 2.0**-24
"""Histogram range used when the first batch is all zeros (it doubles from there as needed)."""


@dataclass(eq=False)  # tensor fields: == would be ambiguous
class ActivationStats:
    """What calibration recorded about one Linear input; enough for every observer.

    absmax, min, max, mean_sq: float32 [C] per input channel; outliers: int64 [C], the count of
    |x| >= OUTLIER_THRESHOLD; hist: int64 [nbins], a signed histogram of all values over
    [-hist_range, hist_range] in equal bins (None when not collected); batch_min, batch_max:
    float32 [B], tensor-level extremes of each calibration batch in order; count: values seen.
    """

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    mean_sq: torch.Tensor
    outliers: torch.Tensor
    hist: torch.Tensor | None
    hist_range: float
    batch_min: torch.Tensor
    batch_max: torch.Tensor
    count: int

    @classmethod
    def from_batches(cls, batches: Iterable[torch.Tensor], nbins: int = DEFAULT_NBINS) -> ActivationStats:
        """Stats of a sequence of [..., C] activation batches (a convenience for tests and notebooks)."""
        acc = StatsAccumulator(nbins)
        for x in batches:
            acc.update(x)
        return acc.finalize()


def _next_pow2(v: float) -> float:
    """Smallest power of two >= v (v > 0): keeps every bin edge exactly representable."""
    mantissa, exponent = math.frexp(v)
    return math.ldexp(1.0, exponent - 1) if mantissa == 0.5 else math.ldexp(1.0, exponent)


class HistogramAccumulator:
    """A signed histogram over [-hist_range, hist_range] that grows by doubling its range.

    The range starts at the next power of two >= the first batch's absmax. A later batch beyond
    it doubles the range (as often as needed); each doubling merges adjacent bin pairs and puts
    the old bins into the middle half. Because the range is a power of two, bin index =
    floor(x / width) + nbins/2 is computed exactly (in float64 where the device has it, which is
    why bins are found with floor + bincount rather than torch.histc's `(x - lo) * n / (hi - lo)`),
    so the merged histogram equals histogramming all data at the final range, bin for bin.
    Like torch.histc, a value equal to +hist_range falls in the last bin; those are tracked so a
    doubling moves them to the bin where +old_range belongs at the new range.
    """

    def __init__(self, nbins: int = DEFAULT_NBINS) -> None:
        if nbins < 2 or nbins % 2:
            raise StatsError(f"histogram bins must be a positive even number, got {nbins}")
        self.nbins = nbins
        self.hist: torch.Tensor | None = None
        self.hist_range = 0.0
        self._at_top = 0  # values equal to +hist_range (they sit in the last bin)

    def _bin_index(self, x: torch.Tensor, hist_range: float) -> torch.Tensor:
        # With a power-of-two bin count the inverse width is a power of two, so x * inv_width is
        # exact in float32 too (4x less memory traffic than float64 on large activations).
        power_of_two = self.nbins & (self.nbins - 1) == 0
        dtype = torch.float32 if power_of_two or x.device.type == "mps" else torch.float64
        inv_width = self.nbins / (2.0 * hist_range)
        # floor, shift and clamp stay in floating point: every value is an integer of at most
        # nbins there, so they are exact, and one int32 conversion at the end is 3-4x cheaper
        # than shifting and clamping int64 indices (bincount takes either).
        idx = (x.to(dtype) * inv_width).floor_().add_(self.nbins // 2).clamp_(0, self.nbins - 1)
        return idx.int()

    def _double(self) -> None:
        assert self.hist is not None
        n = self.nbins
        old = torch.arange(n, device=self.hist.device)
        merged = torch.zeros_like(self.hist).index_add_(0, (n // 2 + old) // 2, self.hist)
        if self._at_top:
            top = torch.tensor([self.hist_range], device=self.hist.device)
            new_top = self._bin_index(top, 2.0 * self.hist_range)
            merged[(n // 2 + n - 1) // 2] -= self._at_top
            merged[new_top] += self._at_top
            self._at_top = 0
        self.hist = merged
        self.hist_range *= 2.0

    def update(self, x: torch.Tensor, absmax: float | None = None) -> None:
        """Add every value of x (any shape) to the histogram (absmax: max |x| if already known)."""
        x = x.detach().reshape(-1)
        if x.numel() == 0:
            return
        absmax = float(x.abs().max()) if absmax is None else absmax
        if not math.isfinite(absmax):  # a nan or inf anywhere makes the max nan or inf
            raise StatsError("activations contain inf or nan; cannot histogram them")
        if self.hist is None:
            self.hist_range = _next_pow2(absmax) if absmax > 0 else _MIN_RANGE
            self.hist = torch.zeros(self.nbins, dtype=torch.int64, device=x.device)
        while absmax > self.hist_range:
            self._double()
        idx = self._bin_index(x, self.hist_range)
        self.hist += torch.bincount(idx, minlength=self.nbins).to(self.hist.device)
        if absmax == self.hist_range:  # only then can a value sit exactly on the top edge
            self._at_top += int((x == self.hist_range).sum())


class StatsAccumulator:
    """Builds an ActivationStats from [..., C] activation batches, one `update` per batch."""

    def __init__(self, nbins: int = DEFAULT_NBINS) -> None:
        self.histogram = HistogramAccumulator(nbins)
        self._absmax: torch.Tensor | None = None
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._sum_sq: torch.Tensor | None = None
        self._outliers: torch.Tensor | None = None
        self._rows = 0
        self._batch_min: list[float] = []
        self._batch_max: list[float] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        x2 = x.reshape(-1, x.shape[-1]).float()
        mn, mx = x2.amin(dim=0), x2.amax(dim=0)
        absmax = max(-float(mn.min()), float(mx.max()))
        self.histogram.update(x2, absmax=absmax)
        sum_sq = x2.square().sum(dim=0).double()  # float32 within a batch, float64 across
        if absmax >= OUTLIER_THRESHOLD:
            outliers = (x2.abs() >= OUTLIER_THRESHOLD).sum(dim=0)
        else:  # no value reaches the threshold: skip a pass over the batch
            outliers = torch.zeros(x2.shape[-1], dtype=torch.int64, device=x2.device)
        if self._min is None:
            self._min, self._max, self._sum_sq, self._outliers = mn, mx, sum_sq, outliers
        else:
            self._min = torch.minimum(self._min, mn)
            self._max = torch.maximum(self._max, mx)
            self._sum_sq += sum_sq
            self._outliers += outliers
        self._rows += x2.shape[0]
        self._batch_min.append(float(mn.min()))
        self._batch_max.append(float(mx.max()))
        self.count += x2.numel()

    def finalize(self) -> ActivationStats:
        if self._min is None or self._max is None or self._sum_sq is None or self._outliers is None:
            raise StatsError("no activations were seen; calibration produced no batches")
        return ActivationStats(
            absmax=torch.maximum(self._min.abs(), self._max.abs()).float(),
            min=self._min.float(),
            max=self._max.float(),
            mean_sq=(self._sum_sq / self._rows).float(),
            outliers=self._outliers.long(),
            hist=self.histogram.hist,
            hist_range=self.histogram.hist_range,
            batch_min=torch.tensor(self._batch_min, dtype=torch.float32),
            batch_max=torch.tensor(self._batch_max, dtype=torch.float32),
            count=self.count,
        )


# --------------------------------------------------------------------------- helpers


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise RecipeError(f"activation bits must be an integer in [2, 16], got {bits!r}")


def _global_min_max(stats: ActivationStats) -> tuple[float, float]:
    if stats.count == 0 or stats.min.numel() == 0:
        raise StatsError("activation stats are empty (count 0)")
    return float(stats.min.min()), float(stats.max.max())


def _histogram(stats: ActivationStats) -> tuple[torch.Tensor, float]:
    """The signed histogram as float64 on the CPU, and its bin width."""
    if stats.hist is None or stats.hist.numel() == 0:
        raise StatsError("activation stats have no histogram; re-run the stats stage with histograms")
    hist = stats.hist.detach().to("cpu", torch.float64)
    if hist.numel() % 2 or float(hist.sum()) <= 0 or stats.hist_range <= 0:
        raise StatsError("activation histogram is empty or malformed")
    return hist, 2.0 * stats.hist_range / hist.numel()


def _fold(hist: torch.Tensor) -> torch.Tensor:
    """Histogram of |x| over [0, range] from the signed one (bin j: |x| in [j w, (j+1) w))."""
    half = hist.numel() // 2
    return hist[half:] + hist[:half].flip(0)


def _quantile(hist: torch.Tensor, lo_edge: float, width: float, q: float) -> float:
    """The value below which a fraction q of the histogram's mass lies (linear within a bin)."""
    cdf = hist.cumsum(0)
    target = q * float(cdf[-1])
    i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype)).clamp(max=hist.numel() - 1))
    below = float(cdf[i - 1]) if i > 0 else 0.0
    frac = (target - below) / float(hist[i]) if float(hist[i]) > 0 else 1.0
    return lo_edge + (i + min(max(frac, 0.0), 1.0)) * width


def _symmetric_or(lo: float, hi: float, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        t = max(abs(lo), abs(hi))
        return -t, t
    return lo, hi


# --------------------------------------------------------------------------- observers


class Observer:
    """Maps ActivationStats to a clip range (lo, hi); symmetric ranges are (-t, t)."""

    name: ClassVar[str] = ""

    def range(self, stats: ActivationStats, bits: int, symmetric: bool) -> tuple[float, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class MinMaxObserver(Observer):
    """The global min and max: no clipping, so one outlier sets the step for every value."""

    name = "minmax"

    def range(self, stats: ActivationStats, bits: int, symmetric: bool) -> tuple[float, float]:
        _check_bits(bits)
        return _symmetric_or(*_global_min_max(stats), symmetric)


class EMAMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max, in batch order.

    lo <- momentum * lo + (1 - momentum) * batch_min, starting from the first batch: a rare
    extreme batch moves the range only a little (as in QAT frameworks' moving-average observers).
    """

    name = "ema_minmax"

    def __init__(self, momentum: float = 0.9) -> None:
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise RecipeError(f"ema_minmax momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)

    def range(self, stats: ActivationStats, bits: int, symmetric: bool) -> tuple[float, float]:
        _check_bits(bits)
        if stats.batch_min.numel() == 0 or stats.batch_min.numel() != stats.batch_max.numel():
            raise StatsError("activation stats have no per-batch min/max for ema_minmax")
        mins, maxs = stats.batch_min.tolist(), stats.batch_max.tolist()
        lo, hi = mins[0], maxs[0]
        for bmin, bmax in zip(mins[1:], maxs[1:]):
            lo = self.momentum * lo + (1.0 - self.momentum) * bmin
            hi = self.momentum * hi + (1.0 - self.momentum) * bmax
        return _symmetric_or(lo, hi, symmetric)


class PercentileObserver(Observer):
    """Clip at a percentile of the histogram: of |x| when symmetric, each tail when asymmetric.

    Asymmetric: lo is the (100 - p)/100 quantile and hi the p/100 quantile of the signed values.
    Never wider than the observed min/max.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99) -> None:
        if not isinstance(percentile, (int, float)) or not 0.0 < percentile <= 100.0:
            raise RecipeError(f"percentile must be in (0, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def range(self, stats: ActivationStats, bits: int, symmetric: bool) -> tuple[float, float]:
        _check_bits(bits)
        gmin, gmax = _global_min_max(stats)
        hist, width = _histogram(stats)
        q = self.percentile / 100.0
        if symmetric:
            t = _quantile(_fold(hist), 0.0, width, q)
            t = min(t, max(abs(gmin), abs(gmax)))
            return -t, t
        lo = _quantile(hist, -stats.hist_range, width, 1.0 - q)
        hi = _quantile(hist, -stats.hist_range, width, q)
        return max(lo, gmin), min(hi, gmax)


class MSEObserver(Observer):
    """Clip ratio on a grid minimising the expected quantization MSE from the histogram.

    Candidates shrink the min-max range by r = k / grid (k = 1..grid). For each, with the grid's
    representable ends [a, b] (from compute_qparams, so the zero point's rounding counts):
    a bin inside contributes rounding noise step^2 / 12 per value, a bin outside (clipping)
    contributes (distance to the nearer end)^2 + width^2 / 12 per value (uniform within a bin).
    """

    name = "mse"

    def __init__(self, grid: int = 100) -> None:
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
            raise RecipeError(f"mse grid must be a positive integer, got {grid!r}")
        self.grid = grid

    def expected_mse(
        self, stats: ActivationStats, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
    ) -> torch.Tensor:
        """Expected squared error per value for each candidate range (lo[k], hi[k])."""
        hist, width = _histogram(stats)
        n = hist.numel()
        centers = -stats.hist_range + (torch.arange(n, dtype=torch.float64) + 0.5) * width
        scale, zp = compute_qparams(lo.float(), hi.float(), bits, symmetric)
        scale, zp = scale.double()[:, None], zp.double()[:, None]
        qmin, qmax = int_range(bits)
        a, b = (qmin - zp) * scale, (qmax - zp) * scale
        c = centers[None, :]
        err = torch.where(
            c < a, (a - c) ** 2 + width**2 / 12, torch.where(c > b, (c - b) ** 2 + width**2 / 12, scale**2 / 12)
        )
        return (err * hist[None, :]).sum(dim=1) / hist.sum()

    def range(self, stats: ActivationStats, bits: int, symmetric: bool) -> tuple[float, float]:
        _check_bits(bits)
        gmin, gmax = _global_min_max(stats)
        ratios = torch.arange(1, self.grid + 1, dtype=torch.float64) / self.grid
        if symmetric:
            t = max(abs(gmin), abs(gmax))
            lo, hi = -t * ratios, t * ratios
        else:
            lo, hi = min(gmin, 0.0) * ratios, max(gmax, 0.0) * ratios
        best = int(torch.argmin(self.expected_mse(stats, lo, hi, bits, symmetric)))
        return float(lo[best]), float(hi[best])


def _smooth(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Give empty bins a tiny mass taken from the others, so KL(P || Q) stays finite.

    As in MXNet's/TVM's `_smooth_distribution`; eps shrinks when a bin would go negative.
    """
    zeros = p == 0
    n_zeros = int(zeros.sum())
    n_nonzeros = p.numel() - n_zeros
    if n_zeros == 0:
        return p
    eps = min(eps, 0.5 * float(p[~zeros].min()) * n_nonzeros / n_zeros)
    return torch.where(zeros, eps, p - eps * n_zeros / n_nonzeros)


class KLObserver(Observer):
    """TensorRT's entropy calibration: the |x| threshold whose quantized distribution diverges least.

    On the |x| histogram (the signed one folded, nbins/2 bins), for each candidate i from `levels`
    bins up to nbins/2: P = the first i bins with all mass beyond folded into bin i-1; Q = the same
    i bins merged into `levels` = 2^(bits-1) quantization levels (128 for int8) and expanded back
    uniformly over each level's non-empty bins. Both are smoothed; the threshold i * width with
    the smallest KL(P || Q) wins. Asymmetric ranges are (-t, t) cut to the observed min/max.
    """

    name = "kl"

    def range(self, stats: ActivationStats, bits: int, symmetric: bool) -> tuple[float, float]:
        _check_bits(bits)
        gmin, gmax = _global_min_max(stats)
        hist, width = _histogram(stats)
        abs_hist = _fold(hist)
        n_half = abs_hist.numel()
        levels = 2 ** (bits - 1)
        if levels > n_half:
            raise StatsError(
                f"kl observer needs at least {2 * levels} histogram bins for {bits} bits, got {2 * n_half}"
            )
        cdf = abs_hist.cumsum(0)
        total = float(cdf[-1])
        best_kl, best_i = math.inf, n_half
        for i in range(levels, n_half + 1):
            sliced = abs_hist[:i]
            p = sliced.clone()
            p[-1] += total - float(cdf[i - 1])
            nonzero = p != 0
            chunk = torch.arange(i) * levels // i
            q_sum = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, sliced)
            q_cnt = torch.zeros(levels, dtype=torch.float64).index_add_(0, chunk, nonzero.double())
            q = torch.where(nonzero, (q_sum / q_cnt.clamp(min=1.0))[chunk], 0.0)
            if float(q.sum()) <= 0:
                continue
            p, q = _smooth(p), _smooth(q)
            p, q = p / p.sum(), q / q.sum()
            kl = float((p * (p / q).log()).sum())
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = min(best_i * width, max(abs(gmin), abs(gmax)))
        if symmetric:
            return -t, t
        return max(-t, gmin), min(t, gmax)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema_minmax": EMAMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "kl": KLObserver,
}


def get_observer(name: str, **options: Any) -> Observer:
    """The observer registered as `name`, built with `options` (RecipeError when either is bad)."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise RecipeError(f"unknown observer {name!r}; known: {', '.join(sorted(OBSERVERS))}")
    try:
        return cls(**options)
    except TypeError:
        raise RecipeError(f"bad options for observer {name!r}: {sorted(options)}") from None
