"""Issue 21: symmetric integer weights use all 2^bits levels (compressed-tensors' rule), the optional
clipping-ratio search only ever lowers the weighted error, its options are checked at load, and
every GPTQ / AWQ recipe's checkpoint gives the same logits in transformers and quantmill's loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantmill.core.errors import RecipeError
from quantmill.core.grid import IntGrid
from quantmill.core.qparams import ClipSearch, compute_qparams, quantize_weight_rtn, search_clip_qparams
from quantmill.io.checkpoint import load_quantized, save_quantized
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext
from quantmill.methods.recipe import Recipe
from quantmill.methods.recipe_files import builtin_recipes, load_recipe
from quantmill.methods.registry import REGISTRY, check_recipe
from quantmill.solvers.gptq import GPTQOptions, gptq_quantize
from tests.tiny import make_tiny_llama


def test_a_symmetric_int4_group_with_extremes_minus_a_and_a_hits_minus_8_and_7():
    a = 0.9375  # scale a / 7.5 = 0.125 exactly, so -a / scale is exactly -7.5 (ties round to even: -8)
    w = torch.tensor([[-a, -0.5, 0.0, 0.2, 0.61, a] + [0.1] * 58])
    qw = quantize_weight_rtn(w, IntGrid.for_weights(4, True), "group", 64)
    assert qw.scale.item() == a / 7.5
    assert qw.q.min().item() == -8 and qw.q.max().item() == 7
    assert qw.dequantize()[0, 0].item() == -1.0 and qw.dequantize()[0, 5].item() == 0.875


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_a_spread_group_uses_every_one_of_the_2_pow_bits_levels(bits):
    levels = 2**bits
    a = levels / 2 - 0.5  # scale exactly 1: -a is a tie that rounds to the even -levels / 2
    w = torch.linspace(-a, a, 4 * levels).reshape(1, -1)
    qw = quantize_weight_rtn(w, IntGrid.for_weights(bits, True), "channel")
    assert qw.scale.item() == 1.0
    assert sorted(set(qw.q.flatten().tolist())) == list(range(-(levels // 2), levels // 2))


def test_8_bit_weights_keep_the_symmetric_absmax_over_127_grid():
    # Gated (quantmill.core.grid.weight_full_range): the int8 grid stays symmetric, -128 unused.
    w = torch.linspace(-1, 1, 1024).reshape(1, -1)
    qw = quantize_weight_rtn(w, IntGrid.for_weights(8, True), "channel")
    assert qw.scale.item() == pytest.approx(1 / 127)
    assert qw.q.min().item() == -127 and qw.q.max().item() == 127


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (3, True), (8, False)])
def test_scales_and_rounding_equal_compressed_tensors(bits, symmetric):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 128, generator=g) * torch.rand(16, 1, generator=g)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=64)
    wg = w.reshape(16, 2, 64)
    ct_scale, ct_zp = calculate_qparams(wg.amin(dim=2), wg.amax(dim=2), args)
    qw = quantize_weight_rtn(w, IntGrid.for_weights(bits, symmetric), "group", 64)
    assert torch.allclose(qw.scale, ct_scale, rtol=1e-6, atol=0)
    assert torch.equal(qw.zero_point.float(), ct_zp.float())
    ct_deq = fake_quantize(w, ct_scale, ct_zp.to(torch.int8), args)
    assert torch.allclose(qw.dequantize(), ct_deq, atol=1e-6)


def test_activation_qparams_keep_the_grid_symmetric_about_zero():
    # Inputs stay absmax / qmax (what vLLM's int8 kernels and QuantLinear compute per token).
    scale, zp = compute_qparams(torch.tensor([-2.0]), torch.tensor([1.0]), 8, True)
    assert scale.item() == pytest.approx(2 / 127) and zp.item() == 0
    full, _ = compute_qparams(torch.tensor([-2.0]), torch.tensor([1.0]), 8, True, full_range=True)
    assert full.item() == pytest.approx(2 / 127.5)


def test_clip_search_never_raises_the_weighted_error_and_clips_an_outlier_group():
    g = torch.Generator().manual_seed(0)
    wg = torch.randn(32, 4, 64, generator=g)
    wg[0, 0, 3] = 12.0  # one outlier: shrinking its group's range helps the other 63 weights
    importance = torch.rand(4, 64, generator=g) + 0.1

    def err(scale, zp):
        deq = (torch.round(wg / scale[..., None]).clamp(-8, 7) - zp[..., None]) * scale[..., None]
        return ((deq - wg).square() * importance).sum(dim=2)

    plain = compute_qparams(wg.amin(dim=2), wg.amax(dim=2), 4, True, full_range=True)
    searched = search_clip_qparams(wg, IntGrid(4, True, full_range=True), ClipSearch(grid=20, min_ratio=0.5), importance)
    assert (err(*searched) <= err(*plain) + 1e-6).all()
    assert searched[0][0, 0] < plain[0][0, 0]
    assert err(*searched).sum() < err(*plain).sum()


def test_gptq_clip_search_lowers_the_layer_loss():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 128, generator=g) * (torch.rand(128, generator=g) * 3 + 0.1)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, 128, generator=g)
    W[torch.randint(0, 64, (20,), generator=g), torch.randint(0, 128, (20,), generator=g)] *= 6  # heavy tails

    def loss(options: GPTQOptions) -> float:
        dW = gptq_quantize(W, H, options).weight.dequantize() - W
        return torch.trace(dW @ H @ dW.T).item()

    for extra in ({}, {"actorder": True, "static_groups": True}):
        plain = loss(GPTQOptions(bits=4, group_size=64, **extra))
        searched = loss(GPTQOptions(bits=4, group_size=64, clip=ClipSearch(), **extra))
        assert searched < plain, extra


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("rtn", {"clip_search": "yes"}, "clip_search must be true or false"),
        ("rtn", {"clip_min_ratio": 0.8}, "need clip_search: true"),
        ("gptq", {"clip_search": True, "clip_min_ratio": 1.5}, "clip_min_ratio must be a number in (0, 1)"),
        ("gptq", {"clip_search": True, "clip_grid": 0}, "clip_grid must be an integer"),
        ("rtn", {"clip": True}, "unknown rtn option"),
    ],
)
def test_clip_options_are_checked_at_load(method, options, message):
    recipe = Recipe(name="r", method=method, weights={"bits": 4, "granularity": "group", "group_size": 64}, options=options)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_recipe(recipe)


def test_clip_search_on_fp8_weights_is_refused():
    recipe = Recipe(name="r", method="gptq", weights={"type": "float", "bits": 8, "granularity": "channel"}, options={"clip_search": True})
    with pytest.raises(RecipeError, match="integer weights"):
        check_recipe(recipe)


# ----------------------------------------------------------------------------- checkpoints

# Every built-in weight-only GPTQ / AWQ recipe (the rtn ones are in test_checkpoint.py).
CHANGED = [
    name for name, _ in sorted(builtin_recipes().items())
    if load_recipe(name).method in ("gptq", "awq") and load_recipe(name).activations is None and load_recipe(name).weights.type == "int"
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("grid") / "m", layers=2)


def _calibration() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    motifs = torch.randint(0, 256, (6, 16), generator=g)
    return torch.stack([motifs[torch.randint(0, 6, (4,), generator=g)].reshape(-1) for _ in range(8)])


@pytest.mark.parametrize("name", CHANGED)
def test_transformers_and_quantmill_load_the_same_logits(tiny, tmp_path, name):
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(name)
    if recipe.weights.group_size == 64:  # the tiny model is 64 wide: groups of 32 keep 2 per row
        recipe = recipe.model_copy(update={"weights": recipe.weights.model_copy(update={"group_size": 32})})
    model = load_model(tiny)
    result = REGISTRY[recipe.method].run(MethodContext(model, recipe, {}, _calibration(), torch.device("cpu")))
    save_quantized(model, result.weights, recipe, tmp_path / "q", {"recipe": name}, tokenizer_dir=tiny)
    config = (tmp_path / "q" / "config.json").read_text()
    assert '"pack-quantized"' in config
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ours = load_quantized(tmp_path / "q")
    ids = _calibration()[:2]
    with torch.no_grad():
        assert (served(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    if recipe.weights.bits < 8:
        q = torch.cat([qw.q.flatten().float() for qw in result.weights.values()])
        assert q.min().item() == -(2 ** (recipe.weights.bits - 1))  # the extra negative level is in use
