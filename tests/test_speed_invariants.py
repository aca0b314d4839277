"""Issue 19's speed changes keep the numbers: each fast form against the plain form it replaced.

bench/compare_stores.py checks the same end to end (every built-in recipe's store entries, old
code against new); these pin each kernel on its own so a later edit cannot drift unnoticed.
"""

from __future__ import annotations

import pytest
import torch

from quantmill.core.grid import IntGrid
from quantmill.core.qparams import ClipSearch, compute_qparams, dequantize, quantize, search_clip_qparams
from quantmill.solvers.awq import _rtn, awq_search_scales, normalised_scales
from quantmill.solvers.observers import HistogramAccumulator


def _clip_search_plain(wg, bits, symmetric, search, importance=None, full_range=True):
    """search_clip_qparams as first written: quantize, dequantize, error, one temporary each."""
    wg = wg.float()
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)
    imp = None if importance is None else importance.float().clamp_min(0).unsqueeze(0)
    best = None
    for r in search.ratios():
        scale, zp = compute_qparams(lo * r, hi * r, bits, symmetric, full_range)
        deq = dequantize(quantize(wg, scale.unsqueeze(-1), zp.unsqueeze(-1), bits), scale.unsqueeze(-1), zp.unsqueeze(-1))
        d2 = (deq - wg).square()
        err = (d2 * imp if imp is not None else d2).sum(dim=2)
        if best is None:
            best = [err, scale, zp]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better, scale, best[1]), torch.where(better, zp, best[2])]
    return best[1], best[2]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_clip_search_in_one_buffer_gives_the_same_bits(symmetric: bool, weighted: bool, bits: int):
    torch.manual_seed(bits)
    wg = (torch.randn(96, 4, 32) * 0.05).reshape(96, 4, 32)
    wg[3, 1, 7] = 1.0  # a stray large weight, so clipping wins somewhere
    importance = torch.rand(4, 32) if weighted else None
    search = ClipSearch(grid=20, min_ratio=0.8)
    fast = search_clip_qparams(wg, IntGrid(bits, symmetric, full_range=True), search, importance)
    plain = _clip_search_plain(wg, bits, symmetric, search, importance)
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])


@pytest.mark.parametrize("nbins", [4096, 1000])
def test_histogram_bins_equal_the_integer_formula(nbins: int):
    acc = HistogramAccumulator(nbins)
    hist_range = 4.0
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100_000) * 1.5, torch.tensor([-4.0, 4.0, 0.0, -0.0, 1e-30, -1e-30])]).clamp(-4.0, 4.0)
    dtype = torch.float32 if nbins & (nbins - 1) == 0 else torch.float64
    plain = (torch.floor(x.to(dtype) * (nbins / (2.0 * hist_range))).long() + nbins // 2).clamp(0, nbins - 1)
    assert torch.equal(acc._bin_index(x, hist_range).long(), plain)


def test_awq_gram_form_scores_the_ratios_as_the_direct_form_and_picks_the_same():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(64, 32, bias=False)]
    X = torch.randn(2048, 64)
    X[:, :4] *= 25.0  # salient channels, so the ratios differ
    mean_abs = X.abs().mean(dim=0)
    s, errors = awq_search_scales(linears, X, mean_abs, 4, 32, True, grid=20)
    direct = []
    for i in range(20):
        si = normalised_scales(mean_abs, i / 20)
        total = sum((X @ (_rtn(lin.weight.detach() * si, 4, 32, True) / si).t() - X @ lin.weight.detach().t()).pow(2).sum().item() for lin in linears)
        direct.append(total / (X.shape[0] * (96 + 32)))
    assert errors == pytest.approx(direct, rel=1e-4)
    assert errors.index(min(errors)) == direct.index(min(direct))
    assert torch.equal(s, normalised_scales(mean_abs, errors.index(min(errors)) / 20))
