"""The evaluation protocol: the float model runs once and leaves a record (its output layer's
inputs and weights); each quantized model is scored against it in one pass, with the exact KL;
every measure comes per window with a paired interval."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from quantmill.eval.evaluate import evaluate_against, evaluate_windows, paired_interval, reference_distributions
from quantmill.io.sources import load_model
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


def test_the_float_record_gives_what_running_both_models_gives(pair):
    reference, candidate, windows = pair
    exact = evaluate_windows(candidate, windows, reference)
    _, record = reference_distributions(reference, windows)
    fast = evaluate_against(candidate, record)
    assert fast.kl == pytest.approx(exact.kl, rel=1e-5)
    assert fast.ppl == pytest.approx(exact.ppl, rel=1e-6)
    assert fast.ppl_ratio == pytest.approx(exact.ppl_ratio, rel=1e-6)
    assert fast.top1_agreement == exact.top1_agreement
    assert fast.max_abs_logit_diff == pytest.approx(exact.max_abs_logit_diff, rel=1e-4)
    assert fast.window_kl == pytest.approx(exact.window_kl, rel=1e-5)
    assert (fast.ppl_ratio_ci95_low, fast.ppl_ratio_ci95_high) == pytest.approx((exact.ppl_ratio_ci95_low, exact.ppl_ratio_ci95_high), rel=1e-6)
    assert fast.kl_method == exact.kl_method == "exact"


def test_the_float_pass_measures_what_the_plain_evaluation_does_and_its_record_round_trips(pair, tmp_path):
    from quantmill.eval.evaluate import ReferenceRecord

    reference, _, windows = pair
    plain = evaluate_windows(reference, windows)
    metrics, record = reference_distributions(reference, windows)
    assert metrics.ppl == pytest.approx(plain.ppl, rel=1e-6) and metrics.window_nll == pytest.approx(plain.window_nll, rel=1e-6)
    assert record.hidden.shape == (3, 47, 64) and record.head_weight.shape == (257, 64)
    record.save(tmp_path / "r.safetensors")
    again = ReferenceRecord.load(tmp_path / "r.safetensors")
    assert torch.equal(again.logits(1), record.logits(1)) and again.softcap is None
    with torch.no_grad():
        full = reference(windows[1:2]).logits[0, :-1]
    assert torch.allclose(record.logits(1), full, atol=1e-4)


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
    from quantmill.tasks.calibrate import CalibrationSpec, EvaluationSpec, capture_calibration
    from quantmill.tasks.evaluate import REFERENCE_FILE, evaluate
    from quantmill.tasks.quantize import quantize
    from quantmill.tasks.resolve import resolve_model
    from quantmill.tasks.stats import collect_stats
    from quantmill.methods.recipe_files import load_recipe

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
    assert metrics["kl_method"] == "exact"
