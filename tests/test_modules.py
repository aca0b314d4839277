"""QuantLinear: the integer path against the fake-quant reference, static against dynamic, bad schemes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantmill.core.errors import RecipeError
from quantmill.core.grid import FP8_DTYPE, FP8_MAX
from quantmill.nn.quant_linear import QuantLinear, QuantScheme, fp8_matmul_available, int8_matmul
from quantmill.solvers.observers import ActivationStats, get_observer

CUDA_FP8 = torch.cuda.is_available() and fp8_matmul_available("cuda")


def _linear(in_features: int = 64, out_features: int = 48, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _input(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x[..., 3] *= 8.0  # one outlier channel, as in LLM activations
    return x


def _calibrated(linear: nn.Linear, scheme: QuantScheme, x: torch.Tensor, path: str) -> QuantLinear:
    act_range = None
    if scheme.act == "static":
        stats = ActivationStats.from_batches([x])
        act_range = get_observer("minmax").range(stats, scheme.act_bits, scheme.act_symmetric)
    return QuantLinear.from_linear(linear, scheme, act_range=act_range, path=path)


INT_SCHEMES = {
    "w8-channel/a8-dynamic": QuantScheme(act="dynamic"),
    "w8-tensor/a8-static": QuantScheme(granularity="tensor", act="static"),
    "w8-channel/a8-static-asym": QuantScheme(act="static", act_symmetric=False),
    "w4-channel-asym/a8-dynamic-asym": QuantScheme(
        weight_bits=4, weight_symmetric=False, act="dynamic", act_symmetric=False
    ),
}


# --------------------------------------------------------------------------- int path == fake path


@pytest.mark.parametrize("name", list(INT_SCHEMES))
def test_int_path_matches_fake_quant_to_float_rounding(name: str) -> None:
    scheme = INT_SCHEMES[name]
    linear, x = _linear(), _input(3, 5, 64)
    fake = _calibrated(linear, scheme, x, "fake")
    real = _calibrated(linear, scheme, x, "int")
    assert real.path == "int" and fake.path == "fake"
    y_fake, y_int = fake(x), real(x)
    assert y_int.shape == (3, 5, 48)
    assert float((y_int - y_fake).abs().max()) <= 1e-5 * float(y_fake.abs().max())

    # the integer path's sum is exact: compare with the same sum in float64
    x2 = x.reshape(-1, 64)
    x_q, x_scale, x_zp = real.quantize_input(x2)
    exact = (x_q.double() - x_zp.double()) @ (real.weight_q.double() - real.weight_zero_point.double()).t()
    y_exact = exact * (x_scale.double() * real.weight_scale.double().reshape(1, -1)) + real.bias.double()
    assert float((y_int.reshape(-1, 48).double() - y_exact).abs().max()) <= 1e-6 * float(y_exact.abs().max())


def test_int8_matmul_accumulates_exactly_in_int32() -> None:
    g = torch.Generator().manual_seed(2)
    for m, k, n in [(3, 13, 7), (17, 64, 48), (40, 1024, 24)]:
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        acc = int8_matmul(a, w)
        assert acc.dtype == torch.int32 and acc.shape == (m, n)
        assert torch.equal(acc.long(), a.long() @ w.long().t())
    extreme = torch.full((2, 1024), -128, dtype=torch.int8)  # 1024 * 128^2 = 2^24: beyond float32's integers
    assert int(int8_matmul(extreme, extreme[:1])[0, 0]) == 1024 * 128 * 128


def test_quantized_output_stays_close_to_the_float_linear() -> None:
    linear, x = _linear(), _input(4, 64)
    y = linear(x).detach()
    for scheme in INT_SCHEMES.values():
        if scheme.weight_bits == 8:
            err = (_calibrated(linear, scheme, x, "int")(x) - y).abs().max()
            assert float(err) < 0.03 * float(y.abs().max()), scheme


# --------------------------------------------------------------------------- static vs dynamic


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("path", ["fake", "int"])
def test_static_equals_dynamic_when_calibrated_on_the_single_token(symmetric: bool, path: str) -> None:
    """One token: its per-token range is the per-tensor range, so both schemes are the same grid."""
    linear, x = _linear(), _input(1, 64)
    static = _calibrated(linear, QuantScheme(act="static", act_symmetric=symmetric), x, path)
    dynamic = _calibrated(linear, QuantScheme(act="dynamic", act_symmetric=symmetric), x, path)
    assert torch.equal(static(x), dynamic(x))


def test_static_asymmetric_zero_point_comes_from_the_observer_range() -> None:
    q = QuantLinear.from_linear(_linear(), QuantScheme(act="static", act_symmetric=False), act_range=(-4.57, 10.8))
    assert float(q.input_scale) == pytest.approx(15.37 / 255) and int(q.input_zero_point) == -52


# --------------------------------------------------------------------------- weight-only and fp8


def test_weight_only_group_scheme_runs_the_fake_path_only() -> None:
    linear, x = _linear(), _input(2, 64)
    scheme = QuantScheme(weight_bits=4, granularity="group", group_size=16)
    q = QuantLinear.from_linear(linear, scheme)
    assert q.path == "fake" and q.weight_scale.shape == (48, 4)
    y = linear(x).detach()
    assert float((q(x) - y).abs().max()) < 0.15 * float(y.abs().max())
    with pytest.raises(RecipeError, match="no integer kernel"):
        QuantLinear.from_linear(linear, scheme, path="int")


def test_fp8_weights_use_per_channel_absmax_over_448() -> None:
    linear, x = _linear(), _input(2, 64)
    q = QuantLinear.from_linear(linear, QuantScheme(weight_type="fp8", act="dynamic", act_type="fp8"), path="fake")
    w = linear.weight.detach()
    assert q.weight_q.dtype == FP8_DTYPE
    assert torch.allclose(q.weight_scale, w.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 (normal range)
    big = w.abs() > 0.05 * w.abs().amax(dim=1, keepdim=True)
    assert float(((q.dequantized_weight() - w).abs() / w.abs())[big].max()) <= 2**-4
    y = linear(x).detach()
    assert float((q(x) - y).abs().max()) < 0.05 * float(y.abs().max())


def _check_fp8_int_path(device: str) -> None:
    linear, x = _linear().to(device), _input(3, 64).to(device)
    for act in ("dynamic", "static"):
        scheme = QuantScheme(weight_type="fp8", act=act, act_type="fp8")
        fake = QuantLinear.from_linear(linear, scheme, act_range=(-30.0, 30.0), path="fake")
        real = QuantLinear.from_linear(linear, scheme, act_range=(-30.0, 30.0), path="int")
        y_fake, y_int = fake(x), real(x)
        assert float((y_int - y_fake).abs().max()) <= 1e-5 * float(y_fake.abs().max())


@pytest.mark.skipif(not CUDA_FP8, reason="fp8 torch._scaled_mm needs a CUDA GPU with compute capability >= 8.9")
def test_fp8_scaled_mm_matches_fake_quant_on_cuda() -> None:
    _check_fp8_int_path("cuda")


@pytest.mark.skipif(not fp8_matmul_available("cpu"), reason="this torch build has no CPU torch._scaled_mm")
def test_fp8_scaled_mm_matches_fake_quant_on_cpu() -> None:
    _check_fp8_int_path("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA torch._int_mm limits (m > 16, k, n % 8) need a GPU")
def test_int8_path_pads_small_shapes_on_cuda() -> None:
    linear, x = _linear(30, 10).cuda(), _input(3, 30).cuda()
    fake = QuantLinear.from_linear(linear, QuantScheme(act="dynamic"), path="fake")
    real = QuantLinear.from_linear(linear, QuantScheme(act="dynamic"), path="int")
    assert float((real(x) - fake(x)).abs().max()) <= 1e-5 * float(fake(x).abs().max())


# --------------------------------------------------------------------------- state and bad input


def test_state_dict_round_trips_into_a_fresh_module() -> None:
    linear, x = _linear(), _input(2, 64)
    scheme = QuantScheme(act="static", act_symmetric=False)
    q = QuantLinear.from_linear(linear, scheme, act_range=(-3.0, 20.0), path="int")
    fresh = QuantLinear(64, 48, scheme)
    fresh.load_state_dict(q.state_dict())
    fresh.path = "int"
    assert set(q.state_dict()) >= {"weight_q", "weight_scale", "weight_zero_point", "bias", "input_scale"}
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("act_type", ["int", "fp8"])
def test_activation_bits_other_than_8_are_a_recipe_error(act_type: str) -> None:
    scheme = QuantScheme(weight_type=act_type, act="dynamic", act_type=act_type, act_bits=4)
    with pytest.raises(RecipeError, match="activation bits"):
        QuantLinear.from_linear(_linear(), scheme)


def test_bad_schemes_are_recipe_errors() -> None:
    linear = _linear()
    with pytest.raises(RecipeError, match="act_range"):
        QuantLinear.from_linear(linear, QuantScheme(act="static"))
    with pytest.raises(RecipeError, match="group_size 48"):
        QuantLinear.from_linear(linear, QuantScheme(granularity="group", group_size=48))
    with pytest.raises(RecipeError, match="granularity"):
        QuantLinear.from_linear(linear, QuantScheme(granularity="row"))
    with pytest.raises(RecipeError, match="fp8 activations are symmetric"):
        QuantLinear.from_linear(linear, QuantScheme(act="dynamic", act_type="fp8", act_symmetric=False))
    with pytest.raises(RecipeError, match="path"):
        QuantLinear.from_linear(linear, QuantScheme(act="dynamic"), path="cuda")


@pytest.mark.parametrize("name", list(INT_SCHEMES) + ["fp8-dynamic", "fp8-static"])
def test_fake_quantize_input_is_bitwise_dequantize_of_quantize_input(name: str) -> None:
    scheme = INT_SCHEMES.get(name) or QuantScheme(weight_type="fp8", act=name.split("-")[1], act_type="fp8")
    x = _input(3, 5, 64).reshape(-1, 64)
    q = QuantLinear.from_linear(_linear(), scheme, act_range=(-10.0, 30.0), path="fake")
    x_q, scale, zp = q.quantize_input(x)
    assert torch.equal(q.fake_quantize_input(x), (x_q.float() - zp.float()) * scale)
