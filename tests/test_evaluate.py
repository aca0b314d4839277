"""The evaluation protocol: the float model runs once and leaves a top-k record; each quantized
model is scored against it in one pass; every measure comes per window with a paired interval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quant.evaluate import evaluate_against, evaluate_windows, paired_interval, reference_distributions
from quant.sources import load_model
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A float tiny Llama, a perturbed copy standing in for its quantized model, and 3 windows."""
    folder = make_tiny_llama(tmp_path_factory.mktemp("eval") / "tiny")
    reference, candidate = load_model(folder), load_model(folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in candidate.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    windows = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(2))
    return reference, candidate, windows


def test_top_k_record_with_one_token_left_gives_the_exact_kl(pair):
    reference, candidate, windows = pair
    exact = evaluate_windows(candidate, windows, reference)
    _, record = reference_distributions(reference, windows, k=256)  # vocab 257: the tail bucket is one token
    fast = evaluate_against(candidate, record)
    assert fast.kl == pytest.approx(exact.kl, rel=1e-5)  # float64 sums here, float32 in kl_div
    assert fast.ppl == pytest.approx(exact.ppl, rel=1e-5)
    assert fast.ppl_ratio == pytest.approx(exact.ppl_ratio, rel=1e-5)
    assert fast.top1_agreement == exact.top1_agreement
    assert fast.window_kl == pytest.approx(exact.window_kl, rel=1e-5)
    assert (fast.ppl_ratio_ci95_low, fast.ppl_ratio_ci95_high) == pytest.approx((exact.ppl_ratio_ci95_low, exact.ppl_ratio_ci95_high), rel=1e-5)
    assert fast.kl_method == "top256+tail" and exact.kl_method == "exact"


def test_a_smaller_top_k_record_bounds_the_kl_from_below_and_grows_with_k(pair):
    # Coarsening both distributions can only lose divergence (data processing); the tiny random
    # model's distributions are nearly flat, the worst case for a top-k record (a real LM's are peaked).
    reference, candidate, windows = pair
    exact = evaluate_windows(candidate, windows, reference).kl
    coarse = [evaluate_against(candidate, reference_distributions(reference, windows, k=k)[1]).kl for k in (16, 64, 256)]
    assert coarse[0] <= coarse[1] <= coarse[2] <= exact * (1 + 1e-5)
    assert coarse[2] == pytest.approx(exact, rel=1e-5)


def test_the_float_pass_measures_what_the_plain_evaluation_does(pair):
    reference, _, windows = pair
    plain = evaluate_windows(reference, windows)
    metrics, record = reference_distributions(reference, windows, k=8)
    assert metrics.ppl == pytest.approx(plain.ppl, rel=1e-6) and metrics.window_nll == pytest.approx(plain.window_nll, rel=1e-6)
    assert record.top_ids.shape == (3, 47, 8) and record.tail_logp.shape == (3, 47)
    # the record's probabilities and its tail add up to one at every position
    total = torch.logsumexp(torch.cat([record.top_logp, record.tail_logp[..., None]], dim=-1), dim=-1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)


def test_the_ratio_interval_is_paired_over_windows_and_holds_the_ratio(pair):
    reference, candidate, windows = pair
    m = evaluate_windows(candidate, windows, reference)
    diffs = [q - r for q, r in zip(m.window_nll, m.window_reference_nll)]
    low, high = paired_interval(diffs)
    assert (m.ppl_ratio_ci95_low, m.ppl_ratio_ci95_high) == pytest.approx((math.exp(low), math.exp(high)))
    assert m.ppl_ratio_ci95_low < m.ppl_ratio < m.ppl_ratio_ci95_high
    assert m.kl_ci95_low <= m.kl <= m.kl_ci95_high


def test_paired_interval_is_the_student_t_interval_of_the_mean():
    # mean 2.5, sd 1.2910, t(0.975, 3) = 3.1824: half-width 2.0543
    low, high = paired_interval([1.0, 2.0, 3.0, 4.0])
    assert (low, high) == pytest.approx((2.5 - 2.0543, 2.5 + 2.0543), abs=1e-4)
    assert paired_interval([1.0]) is None


def test_a_quantized_evaluation_never_runs_the_float_model(prefect_api, tiny_model, home):
    """With the float entry made, the float weights can vanish: the quantized model is scored
    against the stored record alone, in one pass of its own."""
    from tasks.calibrate import CalibrationSpec, EvaluationSpec, capture_calibration
    from tasks.evaluate import REFERENCE_FILE, evaluate
    from tasks.quantize import quantize
    from tasks.resolve import resolve_model
    from tasks.stats import collect_stats
    from quant.recipe import load_recipe

    spec = EvaluationSpec(windows=3, seq_len=64)
    model = resolve_model.fn(str(tiny_model))
    calib = capture_calibration.fn(model, CalibrationSpec(samples=4, seq_len=64))
    stats = collect_stats.fn(model, calib, "cpu")
    q = quantize.fn(model, calib, stats, load_recipe("w4a16-rtn-g64"), "cpu")
    float_entry = evaluate.fn(model, spec, None, "cpu")
    assert Path(float_entry["path"], REFERENCE_FILE).is_file()
    weights = Path(model["path"]) / "checkpoint" / "model.safetensors"
    weights.rename(weights.with_suffix(".hidden"))
    try:
        metrics = evaluate.fn(model, spec, q, "cpu")["manifest"]["metrics"]
    finally:
        weights.with_suffix(".hidden").rename(weights)
    assert len(metrics["window_nll"]) == 3 and len(metrics["window_kl"]) == 3
    assert metrics["reference_ppl"] == pytest.approx(float_entry["manifest"]["metrics"]["ppl"], rel=1e-6)
    assert metrics["ppl_ratio_ci95_low"] < metrics["ppl_ratio"] < metrics["ppl_ratio_ci95_high"]
    assert metrics["kl_method"] == "top128+tail"
