"""The GPTQ solver on small matrices: what it must agree with (RTN when nothing couples the
columns), what it must beat (RTN when inputs are correlated), and what it must survive."""

from __future__ import annotations

import math

import pytest
import torch

from quantmill.core.grid import E4M3, IntGrid, int_range
from quantmill.core.qparams import quantize_weight_rtn
from quantmill.solvers.gptq import GPTQOptions, GPTQResult, HessianAccumulator, gptq_quantize

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_layer(
    out_features: int = 64, in_features: int = 128, samples: int = 2048, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W, X and H = 2/n X^T X for inputs X = Z @ A: a random mixing A makes the columns of X
    strongly correlated, which is where error feedback pays off."""
    g = _gen(seed)
    Z = torch.randn(samples, in_features, generator=g)
    A = torch.randn(in_features, in_features, generator=g)
    X = Z @ A
    W = torch.randn(out_features, in_features, generator=g)
    acc = HessianAccumulator()
    acc.add_batch(X)
    return W, X, acc.H


def _quadratic_error(W: torch.Tensor, H: torch.Tensor, result: GPTQResult) -> float:
    """tr((W - Q) H_damped (W - Q)^T) / 2 with Q = the saved weight dequantized.

    GPTQ's summed per-column losses equal this exactly (each step's OBS loss is the increase of
    the optimum over the still-free columns), so matching it proves that what is saved
    dequantizes to what the solver used, permutation and group map included.
    """
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += result.damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    E = W - result.weight.dequantize().double()
    return float(torch.einsum("oi,ij,oj->", E, H, E) / 2)


def _assert_same_weight(a, b) -> None:
    assert torch.equal(a.q, b.q)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero_point, b.zero_point)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_with_identity_hessian_equals_rtn(device: str, symmetric: bool, group_size: int | None) -> None:
    # H = I (plus any dampening) has a diagonal inverse whose Cholesky factor is diagonal too, so
    # every error-feedback update is an exact zero and GPTQ is round-to-nearest, bit for bit.
    # Blocks of 32 with groups of 16 exercise both the in-block and the lazy cross-block update.
    W = torch.randn(24, 64, generator=_gen(1)).to(device)
    H = torch.eye(64, device=device)
    opts = GPTQOptions(bits=4, symmetric=symmetric, group_size=group_size, blocksize=32, percdamp=0.01)
    result = gptq_quantize(W, H, opts)
    granularity = "channel" if group_size is None else "group"
    rtn = quantize_weight_rtn(W, IntGrid.for_weights(4, symmetric), granularity, group_size)
    assert not result.fallback_rtn and result.weight.g_idx is None
    _assert_same_weight(result.weight, rtn)
    assert result.weight.q.device.type == device


def test_gptq_with_diagonal_hessian_and_actorder_static_groups_equals_rtn() -> None:
    # Distinct diagonal entries make act-order a real permutation; a diagonal H still couples
    # nothing, so after undoing the permutation the result must be plain RTN by groups.
    W = torch.randn(16, 64, generator=_gen(2))
    H = torch.diag(torch.rand(64, generator=_gen(3)) + 0.5)
    opts = GPTQOptions(bits=3, symmetric=False, group_size=16, actorder=True, static_groups=True, blocksize=24)
    result = gptq_quantize(W, H, opts)
    assert result.weight.g_idx is None
    _assert_same_weight(result.weight, quantize_weight_rtn(W, IntGrid.for_weights(3, False), "group", 16))


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_beats_rtn_on_correlated_inputs(device: str) -> None:
    W, X, H = _correlated_layer()
    W, X, H = W.to(device), X.to(device), H.to(device)
    result = gptq_quantize(W, H, GPTQOptions(bits=4, symmetric=True))
    rtn = quantize_weight_rtn(W, IntGrid.for_weights(4, True), "channel")
    err_gptq = torch.linalg.norm(X @ W.T - X @ result.weight.dequantize().T).item()
    err_rtn = torch.linalg.norm(X @ W.T - X @ rtn.dequantize().T).item()
    print(f"\n[{device}] output error ||XW^T - XQ^T||_F: RTN {err_rtn:.2f}, GPTQ {err_gptq:.2f}")
    assert not result.fallback_rtn and result.dead_columns == 0
    assert err_gptq < 0.8 * err_rtn  # about 0.71 on this layer (CPU)
    assert result.loss == pytest.approx(_quadratic_error(W, H, result), rel=1e-3)


def test_fp8_gptq_with_identity_hessian_equals_fp8_rtn() -> None:
    # The e4m3 grid through the same solver: with H = I there is no feedback, so it is RTN's fp8.
    W = torch.randn(24, 64, generator=_gen(11)) * 0.05
    result = gptq_quantize(W, torch.eye(64), GPTQOptions(bits=8, weight_type="fp8", blocksize=32))
    rtn = quantize_weight_rtn(W, E4M3, "channel")
    assert result.weight.q.dtype == torch.float8_e4m3fn
    _assert_same_weight(result.weight, rtn)


@pytest.mark.parametrize("actorder", [False, True])
def test_fp8_gptq_beats_fp8_rtn_on_correlated_inputs(actorder: bool) -> None:
    W, X, H = _correlated_layer(seed=12)
    result = gptq_quantize(W, H, GPTQOptions(bits=8, weight_type="fp8", actorder=actorder))
    rtn = quantize_weight_rtn(W, E4M3, "channel")
    err_gptq = torch.linalg.norm(X @ W.T - X @ result.weight.dequantize().T).item()
    err_rtn = torch.linalg.norm(X @ W.T - X @ rtn.dequantize().T).item()
    print(f"\nfp8 output error ||XW^T - XQ^T||_F (actorder={actorder}): RTN {err_rtn:.3f}, GPTQ {err_gptq:.3f}")
    assert not result.fallback_rtn and result.weight.q.dtype == torch.float8_e4m3fn
    assert torch.equal(result.weight.scale, rtn.scale)  # the grid is RTN's; only the rounding differs
    assert err_gptq < 0.8 * err_rtn
    assert result.loss == pytest.approx(_quadratic_error(W, H, result), rel=1e-3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(bits=4, weight_type="fp8"), "8-bit e4m3"),
        (dict(bits=8, weight_type="fp8", group_size=32), "one scale per output channel"),
        (dict(bits=8, weight_type="fp8", symmetric=False), "symmetric"),
        (dict(bits=8, weight_type="nf4"), "weight_type must be 'int' or 'fp8'"),
    ],
)
def test_fp8_gptq_options_are_checked(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTQOptions(**bad)


@pytest.mark.parametrize(
    "opts",
    [
        GPTQOptions(bits=4, symmetric=True),
        GPTQOptions(bits=4, symmetric=False, group_size=32),
        GPTQOptions(bits=4, symmetric=True, group_size=32, actorder=True),
        GPTQOptions(bits=3, symmetric=False, group_size=64, actorder=True, blocksize=48),
        GPTQOptions(bits=4, symmetric=False, group_size=32, actorder=True, static_groups=True),
        GPTQOptions(bits=4, symmetric=True, actorder=True),
    ],
    ids=["channel", "group", "actorder", "actorder-g64-b48", "actorder-static", "actorder-channel"],
)
def test_saved_weight_dequantizes_to_what_the_solver_used(opts: GPTQOptions) -> None:
    W, _, H = _correlated_layer(out_features=32, in_features=128, samples=512, seed=4)
    result = gptq_quantize(W, H, opts)
    assert result.loss == pytest.approx(_quadratic_error(W, H, result), rel=1e-3)
    qmin, qmax = int_range(opts.bits)
    assert result.weight.q.dtype == torch.int8  # held as int8: bits <= 8 (host memory)
    assert qmin <= int(result.weight.q.min()) and int(result.weight.q.max()) <= qmax
    groups = 1 if opts.group_size is None else 128 // opts.group_size
    assert result.weight.scale.shape == (32, groups) and result.weight.zero_point.shape == (32, groups)


def test_actorder_with_static_groups_keeps_the_plain_layout() -> None:
    W, _, H = _correlated_layer(out_features=32, in_features=128, samples=512, seed=5)
    opts = GPTQOptions(bits=4, symmetric=False, group_size=32, actorder=True, static_groups=True)
    result = gptq_quantize(W, H, opts)
    assert result.weight.g_idx is None and result.weight.group_size == 32
    # Static groups: contiguous groups of the original columns, scales from the original weights.
    rtn = quantize_weight_rtn(W, IntGrid.for_weights(4, False), "group", 32)
    scale, zero = rtn.scale, rtn.zero_point
    assert torch.equal(result.weight.scale, scale) and torch.equal(result.weight.zero_point, zero)
    assert result.loss == pytest.approx(_quadratic_error(W, H, result), rel=1e-3)


def test_actorder_with_dynamic_groups_gives_a_valid_group_map() -> None:
    W, _, H = _correlated_layer(out_features=32, in_features=128, samples=512, seed=6)
    opts = GPTQOptions(bits=4, symmetric=True, group_size=32, actorder=True)
    result = gptq_quantize(W, H, opts)
    g_idx = result.weight.g_idx
    assert g_idx is not None and g_idx.dtype == torch.int32 and g_idx.shape == (128,)
    assert int(g_idx.min()) >= 0 and int(g_idx.max()) < 4
    assert torch.bincount(g_idx.long(), minlength=4).tolist() == [32, 32, 32, 32]
    # The columns solved first (largest H[i,i]) form group 0.
    first = torch.argsort(torch.diag(H), descending=True, stable=True)[:32]
    assert set(torch.nonzero(g_idx == 0).flatten().tolist()) == set(first.tolist())
    assert not torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_singular_hessians_do_not_crash() -> None:
    W = torch.randn(8, 32, generator=_gen(7))
    v = torch.randn(32, generator=_gen(8))
    rank1 = gptq_quantize(W, torch.outer(v, v), GPTQOptions(bits=4, group_size=8))
    assert not rank1.fallback_rtn and math.isfinite(rank1.loss)
    assert torch.isfinite(rank1.weight.dequantize()).all()

    zero = gptq_quantize(W, torch.zeros(32, 32), GPTQOptions(bits=4, actorder=True))
    assert zero.dead_columns == 32 and not zero.fallback_rtn
    # Every input is dead, so every weight is irrelevant and set to 0.
    assert torch.equal(zero.weight.dequantize(), torch.zeros(8, 32))
    assert zero.loss == 0.0


def test_dead_columns_are_zeroed() -> None:
    W, _, H = _correlated_layer(out_features=8, in_features=32, samples=256, seed=9)
    H[:, [3, 17]] = 0
    H[[3, 17], :] = 0
    result = gptq_quantize(W, H, GPTQOptions(bits=4, group_size=16))
    assert result.dead_columns == 2
    assert torch.equal(result.weight.dequantize()[:, [3, 17]], torch.zeros(8, 2))


def test_dampening_is_raised_until_cholesky_succeeds() -> None:
    # I - 1.05 v v^T has one eigenvalue -0.05: 1% of mean(diag) does not fix it, 10% does.
    v = torch.nn.functional.normalize(torch.randn(32, generator=_gen(10)), dim=0)
    H = torch.eye(32) - 1.05 * torch.outer(v, v)
    result = gptq_quantize(torch.randn(8, 32, generator=_gen(11)), H, GPTQOptions(bits=4, percdamp=0.01))
    assert not result.fallback_rtn
    assert result.damp == pytest.approx(0.1)


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_impossible_hessian_falls_back_to_rtn(bad: str) -> None:
    W = torch.randn(8, 32, generator=_gen(12))
    H = torch.eye(32)
    if bad == "nan":
        H[0, 1] = H[1, 0] = float("nan")
    else:
        H = -H  # negative definite: more dampening only makes it worse
    result = gptq_quantize(W, H, GPTQOptions(bits=4, group_size=16, actorder=True, max_damp_tries=3))
    assert result.fallback_rtn and math.isnan(result.loss) and result.weight.g_idx is None
    _assert_same_weight(result.weight, quantize_weight_rtn(W, IntGrid.for_weights(4, True), "group", 16))


def test_hessian_accumulator_over_two_batches_equals_the_whole() -> None:
    g = _gen(13)
    x1 = torch.randn(3, 5, 16, generator=g)  # [batch, seq, in]: rows are tokens
    x2 = torch.randn(7, 16, generator=g).to(torch.bfloat16)
    acc = HessianAccumulator()
    acc.add_batch(x1)
    acc.add_batch(x2)
    X = torch.cat([x1.reshape(-1, 16), x2.float()])
    assert acc.n == 22
    assert acc.H.dtype == torch.float32
    torch.testing.assert_close(acc.H, 2 / 22 * X.T @ X, rtol=1e-5, atol=1e-5)

    fixed = HessianAccumulator(16, device="cpu")
    assert torch.equal(fixed.H, torch.zeros(16, 16)) and fixed.n == 0
    with pytest.raises(ValueError, match="17"):
        fixed.add_batch(torch.randn(2, 17))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_bit_widths_run(bits: int) -> None:
    W, _, H = _correlated_layer(out_features=16, in_features=64, samples=256, seed=14)
    for symmetric in (True, False):
        result = gptq_quantize(W, H, GPTQOptions(bits=bits, symmetric=symmetric, group_size=16, actorder=True))
        qmin, qmax = int_range(bits)
        assert qmin <= int(result.weight.q.min()) and int(result.weight.q.max()) <= qmax
        assert math.isfinite(result.loss) and torch.isfinite(result.weight.dequantize()).all()


def test_more_bits_give_less_loss() -> None:
    W, _, H = _correlated_layer(out_features=16, in_features=64, samples=256, seed=15)
    losses = [gptq_quantize(W, H, GPTQOptions(bits=b)).loss for b in (2, 3, 4, 8)]
    assert losses == sorted(losses, reverse=True)


def test_group_size_must_divide_the_input_columns() -> None:
    with pytest.raises(ValueError, match=r"group size 48 .* 64"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), GPTQOptions(group_size=48))
    with pytest.raises(ValueError, match="bits"):
        GPTQOptions(bits=1)
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(torch.randn(4, 64), torch.eye(32), GPTQOptions())


def test_deterministic_and_inputs_untouched() -> None:
    W, _, H = _correlated_layer(out_features=16, in_features=64, samples=256, seed=16)
    H[:, 5] = 0
    H[5, :] = 0
    W0, H0 = W.clone(), H.clone()
    opts = GPTQOptions(bits=4, group_size=16, actorder=True)
    a, b = gptq_quantize(W, H, opts), gptq_quantize(W, H, opts)
    _assert_same_weight(a.weight, b.weight)
    assert torch.equal(a.weight.g_idx, b.weight.g_idx) and a.loss == b.loss
    assert torch.equal(W, W0) and torch.equal(H, H0)
