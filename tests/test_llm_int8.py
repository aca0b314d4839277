"""LLM.int8(): the two limits of the threshold, outlier decomposition, exact int8 matmul, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.core.errors import RecipeError
from quantmill.core.grid import IntGrid
from quantmill.core.qparams import compute_qparams, dequantize, quantize, quantize_weight_rtn
from quantmill.nn.llm_int8 import LLMInt8Linear, convert_linears, validate_threshold
from quantmill.nn.quant_linear import int8_matmul

OUTLIER_COLUMNS = [5, 20, 41]


def make_linear(seed: int = 0, C: int = 64, out: int = 48) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(C, out)


def inputs_with_outliers(seed: int = 1, C: int = 64) -> torch.Tensor:
    """[4, 32, C] N(0, 1) activations (all |x| < 6) with three feature columns scaled by 50."""
    X = torch.randn(4, 32, C, generator=torch.Generator().manual_seed(seed)).clamp(-5.5, 5.5)
    X[..., OUTLIER_COLUMNS] *= 50.0
    return X


def plain_w8a8_per_token(linear: nn.Linear, x: torch.Tensor, zero_point: bool = False) -> torch.Tensor:
    """Reference int8 W8A8: per-output-row int8 W, per-token int8 X (absmax, or [min, max] with a
    zero point), written with quantmill.core.qparams only."""
    W = quantize_weight_rtn(linear.weight.detach(), IntGrid.for_weights(8, True), "channel").dequantize().double()
    X = x.reshape(-1, x.shape[-1]).double()
    if zero_point:
        scale, zp = compute_qparams(X.amin(dim=1, keepdim=True), X.amax(dim=1, keepdim=True), 8, False)
    else:
        absmax = X.abs().amax(dim=1, keepdim=True)
        scale, zp = compute_qparams(-absmax, absmax, 8, True)
    Xd = dequantize(quantize(X.float(), scale, zp, 8), scale, zp).double()
    return (Xd @ W.t() + linear.bias.double()).float().reshape(*x.shape[:-1], -1)


def test_threshold_inf_is_plain_int8_per_token_w8a8() -> None:
    linear = make_linear()
    x = inputs_with_outliers()
    m = LLMInt8Linear.from_linear(linear, threshold=math.inf)
    y = m(x)
    assert m.outlier_fraction == 0.0
    assert torch.allclose(y, plain_w8a8_per_token(linear, x), rtol=1e-5, atol=1e-5)


def test_threshold_zero_is_the_float_layer_on_the_dequantized_int8_weight() -> None:
    """Documented choice (as bitsandbytes): outlier columns use W_deq = q * scale, not the original W."""
    linear = make_linear()
    x = inputs_with_outliers()
    m = LLMInt8Linear.from_linear(linear, threshold=0.0)
    y = m(x)
    assert m.outlier_fraction == 1.0
    W_deq = quantize_weight_rtn(linear.weight.detach(), IntGrid.for_weights(8, True), "channel").dequantize()
    assert torch.allclose(m.dequantized_weight(), W_deq)
    assert torch.allclose(y, F.linear(x, W_deq, linear.bias), rtol=1e-5, atol=1e-5)
    # ... so what remains against the original float layer is the weight rounding alone: small.
    with torch.no_grad():
        ref = linear(x)
    assert ((y - ref).pow(2).mean() / ref.pow(2).mean()).item() < 1e-4


def test_outlier_decomposition_cuts_error_of_naive_w8a8() -> None:
    linear = make_linear()
    x = inputs_with_outliers()
    with torch.no_grad():
        ref = linear(x)
    naive = LLMInt8Linear.from_linear(linear, threshold=math.inf)
    int8 = LLMInt8Linear.from_linear(linear, threshold=6.0)
    err_naive = (naive(x) - ref).pow(2).mean().item()
    err_int8 = (int8(x) - ref).pow(2).mean().item()
    factor = err_naive / err_int8
    print(f"\nLLM.int8() threshold 6: MSE naive per-token W8A8 {err_naive:.3e}, decomposed {err_int8:.3e}, "
          f"reduction {factor:.1f}x, outlier fraction {int8.outlier_fraction:.4f}")
    assert int8.outlier_fraction == len(OUTLIER_COLUMNS) / 64
    assert int8.outlier_columns.tolist() == OUTLIER_COLUMNS
    # What is left is mostly the int8 rounding of the outlier weight columns, times |x| ~ 50-275.
    assert factor > 10


def test_outlier_fraction_accumulates_over_forwards() -> None:
    m = LLMInt8Linear.from_linear(make_linear(), threshold=6.0)
    m(inputs_with_outliers())
    m(torch.zeros(2, 64))
    assert m.outlier_fraction == 0.0
    assert m.mean_outlier_fraction == pytest.approx(3 / 128)
    m.reset_stats()
    assert m.mean_outlier_fraction == 0.0


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), "6", True, None])
def test_validate_threshold_rejects_non_positive(bad: object) -> None:
    with pytest.raises(RecipeError, match="threshold"):
        validate_threshold(bad)  # type: ignore[arg-type]


def test_validate_threshold_accepts_positive_and_inf_and_module_rejects_negative() -> None:
    assert validate_threshold(6) == 6.0
    assert validate_threshold(math.inf) == math.inf
    with pytest.raises(RecipeError, match="threshold"):
        LLMInt8Linear(8, 8, threshold=-1.0)
    with pytest.raises(RecipeError, match="threshold"):
        convert_linears(nn.Sequential(nn.Linear(8, 8)), threshold=0.0)


@pytest.mark.parametrize("shape", [(32, 64, 48), (3, 7, 5), (17, 24, 8)])
def test_int8_matmul_backends_agree_exactly(shape: tuple[int, int, int]) -> None:
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    A = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)  # [out, in], as a weight
    exact = A.long() @ B.long().t()
    emulated = int8_matmul(A, B, "emulate")
    assert emulated.dtype == torch.int32 and torch.equal(emulated.long(), exact)
    assert torch.equal(int8_matmul(A, B, "auto").long(), exact)
    try:
        fast = int8_matmul(A, B, "int_mm")
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._int_mm does not take {shape} on this device: {e}")
    assert torch.equal(fast.long(), exact)


def test_module_output_is_identical_with_either_backend() -> None:
    linear = make_linear()
    x = inputs_with_outliers()
    a = LLMInt8Linear.from_linear(linear, 6.0, backend="auto")(x)
    b = LLMInt8Linear.from_linear(linear, 6.0, backend="emulate")(x)
    assert torch.equal(a, b)


def test_state_dict_holds_int8_weight_scales_bias_threshold_and_round_trips() -> None:
    linear = make_linear()
    x = inputs_with_outliers()
    m = LLMInt8Linear.from_linear(linear, threshold=4.0)
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias", "threshold", "input_zero_point"}
    assert sd["weight"].dtype == torch.int8 and sd["weight_scale"].shape == (48, 1)
    fresh = LLMInt8Linear(64, 48, bias=True)
    fresh.load_state_dict(sd)
    assert fresh.threshold.item() == 4.0
    assert torch.equal(fresh(x), m(x))


def test_convert_linears_on_a_tiny_model_skips_lm_head_and_stays_close() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        names = convert_linears(model, threshold=6.0)
        out = model(ids).logits
    assert len(names) == 14 and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear)
    assert ((out - ref).pow(2).mean() / ref.pow(2).mean()).item() < 1e-3


def one_sided_inputs(seed: int = 2, C: int = 64) -> torch.Tensor:
    """Small N(0, 0.5^2) activations, the three outlier columns at ~50x, and two columns near -5:
    under the threshold, so they stay in the int8 part and make each token's range one-sided."""
    g = torch.Generator().manual_seed(seed)
    X = (0.5 * torch.randn(4, 32, C, generator=g)).clamp(-1.5, 1.5)
    X[..., OUTLIER_COLUMNS] *= 50.0
    X[..., [7, 33]] = -5.0 + 0.3 * torch.rand(4, 32, 2, generator=g)
    return X


def test_zeropoint_with_threshold_inf_is_plain_int8_per_token_w8a8_with_a_zero_point() -> None:
    linear = make_linear()
    x = one_sided_inputs()
    m = LLMInt8Linear.from_linear(linear, threshold=math.inf, zero_point=True)
    assert torch.allclose(m(x), plain_w8a8_per_token(linear, x, zero_point=True), rtol=1e-5, atol=1e-5)


def test_zeropoint_decomposition_beats_absmax_on_one_sided_inputs_and_backends_agree() -> None:
    # The paper's zeropoint vector-wise variant: the remaining columns of a token are mostly
    # negative here, so [min, max] onto 256 levels is a finer grid than [-absmax, absmax].
    linear = make_linear()
    x = one_sided_inputs()
    absmax = LLMInt8Linear.from_linear(linear, 6.0)
    # Against the layer on the de-quantized weight: what is left is the input rounding alone.
    ref = F.linear(x, absmax.dequantized_weight(), linear.bias).detach()
    zp = LLMInt8Linear.from_linear(linear, 6.0, zero_point=True)
    err_absmax = (absmax(x) - ref).pow(2).mean().item()
    err_zp = (zp(x) - ref).pow(2).mean().item()
    print(f"\nLLM.int8() t=6 MSE: absmax {err_absmax:.3e}, zeropoint {err_zp:.3e} ({err_absmax / err_zp:.2f}x)")
    assert zp.outlier_fraction == absmax.outlier_fraction == len(OUTLIER_COLUMNS) / 64
    assert err_zp < 0.5 * err_absmax
    emulated = LLMInt8Linear.from_linear(linear, 6.0, backend="emulate", zero_point=True)
    kernel = LLMInt8Linear.from_linear(linear, 6.0, backend="int_mm", zero_point=True)  # torch._int_mm
    assert torch.equal(emulated(x), kernel(x))  # the zero-point correction is integer arithmetic too


def test_zeropoint_flag_round_trips_in_the_state_dict() -> None:
    linear = make_linear()
    x = one_sided_inputs()
    m = LLMInt8Linear.from_linear(linear, threshold=6.0, zero_point=True)
    fresh = LLMInt8Linear(64, 48, bias=True)
    assert not bool(fresh.input_zero_point)
    fresh.load_state_dict(m.state_dict())
    assert bool(fresh.input_zero_point) and torch.equal(fresh(x), m(x))
    assert "inputs=zeropoint" in repr(fresh)
