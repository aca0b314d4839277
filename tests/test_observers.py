"""Observers and the statistics they read: worked examples, grid invariants, known distributions."""

from __future__ import annotations

import pytest
import torch

from quantmill.core.errors import RecipeError, StatsError
from quantmill.core.qparams import compute_qparams, dequantize, fake_quantize, int_range, quantize
from quantmill.solvers.observers import (
    OBSERVERS,
    ActivationStats,
    EMAMinMaxObserver,
    HistogramAccumulator,
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    get_observer,
)


def _qparams(rng: tuple[float, float], bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return compute_qparams(torch.tensor(rng[0]), torch.tensor(rng[1]), bits, symmetric)


def _quant_mse(x: torch.Tensor, rng: tuple[float, float], bits: int, symmetric: bool) -> float:
    scale, zp = _qparams(rng, bits, symmetric)
    return float((fake_quantize(x, scale, zp, bits) - x).double().square().mean())


# --------------------------------------------------------------------------- worked examples


def test_absmax_worked_example_scale_is_absmax_over_127() -> None:
    x = torch.tensor([0.4, -0.3, -1.2, 0.5])
    stats = ActivationStats.from_batches([x[:, None]])
    lo, hi = MinMaxObserver().range(stats, 8, symmetric=True)
    assert (lo, hi) == pytest.approx((-1.2, 1.2))
    scale, zp = _qparams((lo, hi), 8, True)
    assert float(scale) == pytest.approx(1.2 / 127)
    assert quantize(x, scale, zp, 8).tolist() == [42, -32, -127, 53]


def test_point_three_rounds_to_38_and_back_to_0_2992() -> None:
    scale, zp = _qparams((-1.0, 1.0), 8, True)
    q = quantize(torch.tensor(0.3), scale, zp, 8)
    assert int(q) == 38
    assert float(dequantize(q, scale, zp)) == pytest.approx(38 / 127) == pytest.approx(0.2992, abs=1e-4)


def test_worked_example_symmetric_absmax_10_8() -> None:
    x = torch.tensor([-4.57, 3.08, 5.47, -1.95, 10.8])
    rng = MinMaxObserver().range(ActivationStats.from_batches([x[:, None]]), 8, symmetric=True)
    assert rng == pytest.approx((-10.8, 10.8))
    scale, zp = _qparams(rng, 8, True)
    assert float(scale) == pytest.approx(10.8 / 127) and int(zp) == 0
    q = quantize(x, scale, zp, 8)
    assert q.tolist() == [-54, 36, 64, -23, 127]
    assert dequantize(q, scale, zp).tolist() == pytest.approx([-4.5921, 3.0614, 5.4425, -1.9559, 10.8], abs=1e-4)


def test_worked_example_asymmetric_zero_point() -> None:
    x = torch.tensor([-4.57, 3.08, 5.47, -1.95, 10.8])
    rng = MinMaxObserver().range(ActivationStats.from_batches([x[:, None]]), 8, symmetric=False)
    assert rng == pytest.approx((-4.57, 10.8))
    scale, zp = _qparams(rng, 8, False)
    # scale = (10.8 + 4.57) / 255; zero point = -128 - round(-4.57 / scale) = -128 + 76
    assert float(scale) == pytest.approx(15.37 / 255)
    assert int(zp) == -52
    q = quantize(x, scale, zp, 8)
    assert q.tolist() == [-128, -1, 39, -84, 127]
    assert dequantize(q, scale, zp).tolist() == pytest.approx([-4.5809, 3.0740, 5.4850, -1.9288, 10.7891], abs=1e-4)


def test_clipping_to_six_sends_outliers_to_the_range_ends() -> None:
    x = torch.tensor([0.5, -2.25, 55.48, 256.0, -3.1, -300.0])
    stats = ActivationStats.from_batches([x[:, None]])
    assert stats.outliers.tolist() == [3]  # 55.48, 256 and -300 have |x| >= 6
    scale, zp = _qparams((-6.0, 6.0), 8, True)
    q = quantize(x, scale, zp, 8)
    assert q.tolist() == [11, -48, 127, 127, -66, -128]
    xq = dequantize(q, scale, zp)
    assert xq[2] == xq[3] == pytest.approx(6.0)  # 55.48 and 256 both become the top of the range
    assert float(xq[5]) == pytest.approx(-128 * 6.0 / 127)  # the signed grid's bottom end is -128 steps


def test_rounding_error_is_at_most_half_a_step_inside_the_range() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        bits = int(torch.randint(2, 9, (1,), generator=g))
        symmetric = bool(torch.randint(0, 2, (1,), generator=g))
        magnitude = 10 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        lo, hi = sorted((torch.randn(2, generator=g) * magnitude).tolist())
        scale, zp = _qparams((lo, hi), bits, symmetric)
        qmin, qmax = int_range(bits)
        a, b = float((qmin - zp) * scale), float((qmax - zp) * scale)
        x = a + (b - a) * torch.rand(1000, generator=g)
        err = (dequantize(quantize(x, scale, zp, bits), scale, zp) - x).abs()
        assert float(err.max()) <= float(scale) / 2 * (1 + 1e-5) + 1e-6 * max(abs(a), abs(b))


# --------------------------------------------------------------------------- histogram


def _histc(x: torch.Tensor, hist_range: float, nbins: int) -> torch.Tensor:
    """Reference: every value at once at the final range (float64 makes x + range exact here)."""
    return torch.histc(x.double(), bins=nbins, min=-hist_range, max=hist_range).long()


@pytest.mark.parametrize("nbins", [4096, 4098])  # 4098: bin pairs straddle the old range's ends
def test_histogram_range_doubling_merges_bins_exactly(nbins: int) -> None:
    g = torch.Generator().manual_seed(1)
    edges = torch.tensor([1.0, -1.0, 0.5, 0.0])  # values on the first range's ends and bin edges
    batches = [torch.cat([torch.randn(20_000, generator=g) * 0.3, edges]).clamp(-1, 1)]
    batches += [(torch.randn(20_000, generator=g) * s).clamp(-1000, 1000) for s in (0.2, 3.0, 41.0, 5.0, 300.0)]
    batches += [torch.tensor([1024.0, -7.5])]  # ends exactly on a power of two
    acc = HistogramAccumulator(nbins)
    acc.update(batches[0])
    assert acc.hist_range == 1.0  # the next power of two >= the first batch's absmax (exactly 1.0)
    for b in batches[1:]:
        acc.update(b)
    data = torch.cat(batches)
    assert acc.hist_range == 1024.0
    assert int(acc.hist.sum()) == data.numel()
    assert torch.equal(acc.hist, _histc(data, acc.hist_range, nbins))
    once = HistogramAccumulator(nbins)
    once.update(data)
    assert once.hist_range == acc.hist_range and torch.equal(once.hist, acc.hist)


def test_histogram_starts_at_next_power_of_two_and_rejects_nan() -> None:
    acc = HistogramAccumulator(64)
    acc.update(torch.tensor([0.7, -0.2]))
    assert acc.hist_range == 1.0
    acc.update(torch.tensor([2.5]))
    assert acc.hist_range == 4.0
    with pytest.raises(StatsError, match="nan"):
        acc.update(torch.tensor([float("nan")]))
    with pytest.raises(StatsError, match="even"):
        HistogramAccumulator(7)


def test_stats_accumulate_per_channel_and_per_batch() -> None:
    b1 = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    b2 = torch.tensor([[[-1.0, 7.0]]])
    s = ActivationStats.from_batches([b1, b2], nbins=16)
    assert s.absmax.tolist() == [3.0, 7.0] and s.min.tolist() == [-1.0, -2.0] and s.max.tolist() == [3.0, 7.0]
    assert s.mean_sq.tolist() == pytest.approx([11 / 3, 53 / 3])
    assert s.outliers.tolist() == [0, 1]
    assert s.batch_min.tolist() == [-2.0, -1.0] and s.batch_max.tolist() == [3.0, 7.0]
    assert s.count == 6 and int(s.hist.sum()) == 6 and s.hist_range == 8.0


# --------------------------------------------------------------------------- known distributions


@pytest.fixture(scope="module")
def uniform_stats() -> ActivationStats:
    g = torch.Generator().manual_seed(2)
    return ActivationStats.from_batches([(torch.rand(200_000, 4, generator=g) * 2 - 1)])


def test_uniform_minmax_and_percentile(uniform_stats: ActivationStats) -> None:
    lo, hi = MinMaxObserver().range(uniform_stats, 8, symmetric=False)
    assert lo == pytest.approx(-1.0, abs=1e-4) and hi == pytest.approx(1.0, abs=1e-4)
    lo, hi = PercentileObserver(99.9).range(uniform_stats, 8, symmetric=True)
    assert hi == -lo == pytest.approx(0.999, abs=5e-4)
    lo, hi = PercentileObserver(99.9).range(uniform_stats, 8, symmetric=False)  # 0.1% in each tail
    assert (lo, hi) == pytest.approx((-0.998, 0.998), abs=5e-4)
    assert PercentileObserver(100).range(uniform_stats, 8, True)[1] == pytest.approx(1.0, abs=1e-4)


OUTLIER_VALUE = 100.0


@pytest.fixture(scope="module")
def gaussian_with_outliers() -> tuple[torch.Tensor, ActivationStats]:
    """1e6 samples of N(0, 1) plus 10 planted values at 100: one channel, one batch."""
    g = torch.Generator().manual_seed(3)
    bulk = torch.randn(1_000_000, generator=g)
    x = torch.cat([bulk, torch.full((10,), OUTLIER_VALUE)])
    return bulk, ActivationStats.from_batches([x[:, None]])


def test_outliers_set_minmax_but_clipping_observers_ignore_them(
    gaussian_with_outliers: tuple[torch.Tensor, ActivationStats],
) -> None:
    bulk, stats = gaussian_with_outliers
    ranges = {name: get_observer(name).range(stats, 8, symmetric=True) for name in OBSERVERS}
    print({name: round(r[1], 4) for name, r in ranges.items()})
    assert ranges["minmax"] == pytest.approx((-100.0, 100.0))
    assert ranges["ema_minmax"] == pytest.approx((-100.0, 100.0))  # one batch: nothing to average
    assert ranges["percentile"][1] < 10 and ranges["kl"][1] < 10
    # MSE minimises the error of *all* values, the 10 outliers included: at 8 bits their clipping
    # cost (1e-5 * (100 - t)^2) balances the rounding cost (t/127)^2/12 near t = 66.
    assert ranges["mse"][1] < 80
    mse_minmax = _quant_mse(bulk, ranges["minmax"], 8, True)
    for name in ("percentile", "mse", "kl"):
        assert _quant_mse(bulk, ranges[name], 8, True) < 0.5 * mse_minmax, name
    # at 4 bits rounding dominates and MSE clips hard too
    assert MSEObserver().range(stats, 4, symmetric=True)[1] < 10


def test_mse_observer_minimises_total_error_among_observers(
    gaussian_with_outliers: tuple[torch.Tensor, ActivationStats],
) -> None:
    bulk, stats = gaussian_with_outliers
    x = torch.cat([bulk, torch.full((10,), OUTLIER_VALUE)])
    errors = {n: _quant_mse(x, get_observer(n).range(stats, 8, True), 8, True) for n in ("minmax", "percentile", "mse")}
    assert errors["mse"] == min(errors.values())


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_choice_matches_brute_force_on_the_data(symmetric: bool) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200_000, generator=g)
    if not symmetric:
        x = x.exp() - 0.5  # skewed: asymmetric ranges matter
    stats = ActivationStats.from_batches([x[:, None]])
    obs = MSEObserver(grid=50)
    chosen = _quant_mse(x, obs.range(stats, 4, symmetric), 4, symmetric)
    lo, hi = MinMaxObserver().range(stats, 4, symmetric)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    brute = min(_quant_mse(x, (lo * k / 50, hi * k / 50), 4, symmetric) for k in range(1, 51))
    assert chosen <= 1.03 * brute
    assert chosen < 0.5 * _quant_mse(x, (lo, hi), 4, symmetric)


def test_kl_keeps_a_light_tailed_bulk_and_cuts_sparse_outliers() -> None:
    g = torch.Generator().manual_seed(5)
    stats = ActivationStats.from_batches([torch.randn(200_000, 1, generator=g)])
    lo, hi = KLObserver().range(stats, 8, symmetric=True)
    # on a Gaussian the divergence keeps falling as the threshold grows: int8 barely clips it
    assert lo == -hi and 0.9 * float(stats.absmax.max()) < hi <= float(stats.absmax.max())
    # uniform[-1, 1] plus 10 values at 7.9: the threshold lands on the bulk's edge
    x = torch.cat([torch.rand(100_000, generator=g) * 2 - 1, torch.full((10,), 7.9)])
    stats = ActivationStats.from_batches([x[:, None]])
    assert KLObserver().range(stats, 8, symmetric=True) == pytest.approx((-1.0, 1.0), abs=1e-2)
    lo_a, hi_a = KLObserver().range(stats, 8, symmetric=False)  # (-t, t) cut to the observed min/max
    assert hi_a == pytest.approx(1.0, abs=1e-2) and lo_a == float(stats.min.min())


def test_ema_minmax_averages_batch_extremes_in_order() -> None:
    stats = ActivationStats.from_batches([torch.tensor([[-1.0], [2.0]]), torch.tensor([[-3.0], [4.0]])])
    lo, hi = EMAMinMaxObserver(momentum=0.9).range(stats, 8, symmetric=False)
    assert (lo, hi) == pytest.approx((0.9 * -1 + 0.1 * -3, 0.9 * 2 + 0.1 * 4))
    assert EMAMinMaxObserver(0.9).range(stats, 8, symmetric=True) == pytest.approx((-2.2, 2.2))
    assert EMAMinMaxObserver(0.0).range(stats, 8, symmetric=False) == pytest.approx((-3.0, 4.0))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("percentile", [0, 100.5, -1])
def test_percentile_outside_0_100_is_a_recipe_error(percentile: float) -> None:
    with pytest.raises(RecipeError, match="percentile"):
        get_observer("percentile", percentile=percentile)


def test_registry_rejects_unknown_names_and_options() -> None:
    assert set(OBSERVERS) == {"minmax", "ema_minmax", "percentile", "mse", "kl"}
    assert isinstance(get_observer("percentile", percentile=99.9), PercentileObserver)
    with pytest.raises(RecipeError, match="'histogram'"):
        get_observer("histogram")
    with pytest.raises(RecipeError, match="'minmax'"):
        get_observer("minmax", momentum=0.5)
    with pytest.raises(RecipeError, match="momentum"):
        get_observer("ema_minmax", momentum=1.0)
    with pytest.raises(RecipeError, match="grid"):
        get_observer("mse", grid=0)


@pytest.mark.parametrize("name", ["percentile", "mse", "kl"])
def test_histogram_observers_need_a_histogram(name: str) -> None:
    stats = ActivationStats.from_batches([torch.randn(100, 2)], nbins=256)
    stats.hist = None
    with pytest.raises(StatsError, match="histogram"):
        get_observer(name).range(stats, 8, True)
    stats.hist = torch.zeros(256, dtype=torch.int64)
    with pytest.raises(StatsError, match="histogram"):
        get_observer(name).range(stats, 8, True)
