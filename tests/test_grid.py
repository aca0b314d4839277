"""The two grids (quantmill/core/grid.py): their levels, the round trip onto them, the one
dequantization both share, and agreement with compressed-tensors' own qparams and rounding
(what transformers and vLLM decode a checkpoint with)."""

from __future__ import annotations

import pytest
import torch

from quantmill.core.grid import E4M3, FP8_DTYPE, FP8_MAX, E4M3Grid, IntGrid, weight_grid
from quantmill.core.qparams import quantize_weight_rtn

GRIDS = [IntGrid(4, True, full_range=True), IntGrid(4, False), IntGrid(8, True), IntGrid(3, False), E4M3]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_worked_example_0_3_rounds_to_38_and_back_to_0_2992_at_absmax_1() -> None:
    grid = IntGrid(8, True)
    scale, zp = grid.qparams(torch.tensor(-1.0), torch.tensor(1.0))
    assert scale.item() == pytest.approx(1 / 127) and zp.item() == 0
    q = grid.round(torch.tensor(0.3), scale, zp)
    assert q.item() == 38 and q.dtype == torch.int32
    assert grid.dequantize(q, scale, zp).item() == pytest.approx(0.2992, abs=1e-4)


@pytest.mark.parametrize(
    "grid,levels",
    [(IntGrid(4, True, full_range=True), 16), (IntGrid(4, True), 15), (IntGrid(4, False), 16), (IntGrid(8, True), 255)],
)
def test_a_dense_range_lands_on_every_level_of_the_int_grid(grid, levels: int) -> None:
    # +-0.9375 makes the 4-bit scales exact (0.125): -0.9375 / scale is the tie -7.5, which
    # rounds to the even -8 (full range); the restricted grid's +-7 leaves -8 unused.
    x = torch.linspace(-0.9375, 0.9375, 200_001)
    scale, zp = grid.qparams(x.min(), x.max())
    q = grid.round(x, scale, zp)
    assert torch.unique(q).numel() == levels
    assert int(q.min()) - int(zp) >= -(2 ** (grid.bits - 1)) and int(q.max()) <= 2 ** (grid.bits - 1) - 1


def test_every_e4m3_value_is_its_own_rounding_and_a_dense_range_rounds_onto_them() -> None:
    # 256 codes: two NaNs, and +0 / -0 are one value, so 253 distinct finite values.
    values = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    values = values[values.isfinite()]
    scale, zp = E4M3.qparams(values.min(), values.max())
    assert scale.item() == 1.0
    assert torch.equal(E4M3.fake_quantize(values, scale, zp), values)
    assert torch.unique(values).numel() == 253
    dense = E4M3.fake_quantize(torch.linspace(-500, 500, 100_001), scale, zp)
    assert bool(torch.isin(dense, values).all()) and dense.min() == -FP8_MAX and dense.max() == FP8_MAX


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_values_on_the_grid_round_trip_exactly(grid) -> None:
    x = torch.randn(64, 256, generator=_gen(1)) * torch.rand(64, 1, generator=_gen(2))
    scale, zp = grid.qparams(x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True))
    q = grid.round(x, scale, zp)
    on_grid = grid.dequantize(q, scale, zp)
    assert torch.equal(grid.round(on_grid, scale, zp), q)
    assert torch.equal(grid.fake_quantize(on_grid, scale, zp), on_grid)
    assert torch.equal(grid.fake_quantize(x, scale, zp), on_grid)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_an_all_zero_range_gets_scale_1_and_quantizes_exactly(grid) -> None:
    scale, zp = grid.qparams(torch.zeros(3, 1), torch.zeros(3, 1))
    assert torch.equal(scale, torch.ones(3, 1)) and zp.dtype == torch.int32
    assert torch.equal(grid.fake_quantize(torch.zeros(3, 5), scale, zp), torch.zeros(3, 5))


def test_e4m3_saturates_at_448_instead_of_giving_nan() -> None:
    q = E4M3.round(torch.tensor([1000.0, -1000.0, 3.0]), torch.tensor(1.0), torch.tensor(0))
    assert q.dtype == FP8_DTYPE
    assert q.float().tolist() == [FP8_MAX, -FP8_MAX, 3.0]


def test_e4m3_dequantization_is_the_integer_formula_with_zero_point_0_bit_for_bit() -> None:
    # The one `dequantize`, (q - zero_point) * scale, serves both grids: q - 0 is q exactly.
    x = torch.randn(32, 64, generator=_gen(3))
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    scale, zp = E4M3.qparams(x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True))
    q = E4M3.round(x, scale, zp)
    assert torch.equal((q.float() * scale).view(torch.int32), E4M3.dequantize(q, scale, zp).view(torch.int32))


def test_e4m3_scales_from_a_float64_range_divide_in_float64_as_the_static_scales_did() -> None:
    lo, hi = -3.0000001, 2.5  # not a float32 number
    scale, _ = E4M3.qparams(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64))
    assert scale.dtype == torch.float32
    assert scale.item() == torch.tensor(max(abs(lo), abs(hi)) / FP8_MAX).item()


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_int_grid_equals_compressed_tensors_qparams_and_rounding(bits: int, symmetric: bool) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(16, 128, generator=_gen(bits)) * torch.rand(16, 1, generator=_gen(bits + 1))
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="channel")
    ct_scale, ct_zp = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    grid = IntGrid(bits, symmetric, full_range=True)  # compressed-tensors' rule at every width
    scale, zp = grid.qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True))
    assert torch.allclose(scale, ct_scale, rtol=1e-6, atol=0)
    assert torch.equal(zp.float(), ct_zp.float())
    assert torch.allclose(grid.fake_quantize(w, scale, zp), fake_quantize(w, ct_scale, ct_zp.to(torch.int8), args), atol=1e-6)


def test_e4m3_grid_equals_compressed_tensors_fp8_qparams_and_rounding() -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(16, 128, generator=_gen(8)) * torch.rand(16, 1, generator=_gen(9))
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    ct_scale, ct_zp = calculate_qparams(lo, hi, args)
    scale, zp = E4M3.qparams(lo, hi)
    assert torch.equal(scale, ct_scale.float())
    assert not ct_zp.float().any() and not zp.any()
    assert torch.equal(E4M3.fake_quantize(w, scale, zp), fake_quantize(w, ct_scale, ct_zp, args))


def test_rtn_weights_on_either_grid_dequantize_to_their_fake_quantization() -> None:
    w = torch.randn(8, 64, generator=_gen(4))
    for grid, granularity, group_size in [(IntGrid.for_weights(4, False), "group", 16), (E4M3, "channel", None), (E4M3, "tensor", None)]:
        qw = quantize_weight_rtn(w, grid, granularity, group_size)
        assert qw.q.dtype == grid.dtype and qw.bits == grid.bits
        wg = w.reshape(8, -1, group_size or 64) if granularity != "tensor" else w.reshape(8, 1, 64)
        s, z = qw.scale.unsqueeze(-1), qw.zero_point.unsqueeze(-1)
        assert torch.equal(qw.dequantize(), grid.fake_quantize(wg, s, z).reshape(8, 64))


def test_weight_grid_names_the_scheme_and_refuses_what_has_no_grid() -> None:
    assert weight_grid("int", 4, True) == IntGrid(4, True, full_range=True)
    assert weight_grid("int", 8, True) == IntGrid(8, True, full_range=False)
    assert weight_grid("fp8", 8, True) is E4M3 and weight_grid("float", 8, True) is E4M3
    assert isinstance(E4M3, E4M3Grid) and E4M3.dtype == FP8_DTYPE
    with pytest.raises(ValueError, match="8-bit and symmetric"):
        weight_grid("fp8", 4, True)
    with pytest.raises(ValueError, match="unknown weight grid"):
        weight_grid("nf4", 4, True)
