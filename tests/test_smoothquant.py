"""SmoothQuant: exact folding, outlier migration, alpha search, user errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.core.errors import RecipeError
from quantmill.model.arch import ARCHITECTURES
from quantmill.solvers.smoothquant import (
    ALPHA_GRID,
    FakeW8A8Linear,
    alpha_errors,
    apply_fake_w8a8,
    best_alpha,
    fold_names,
    fold_smoothing,
    gqa_column_index,
    search_fold_alphas,
    smooth_decoder_layer,
    smoothing_scales,
    weight_absmax,
)
from tests.tiny import capture_block_inputs

LLAMA = ARCHITECTURES["llama"].block  # the block names the method passes in
OUTLIER_CHANNELS = [3, 17, 40]


def tiny_model_with_outliers(seed: int = 0) -> LlamaForCausalLM:
    """Tiny GQA Llama (4 heads, 2 KV heads) whose norms produce a few ~50x activation channels."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[OUTLIER_CHANNELS] *= 50.0
            layer.post_attention_layernorm.weight[OUTLIER_CHANNELS[:2]] *= 50.0
    return model


def collect_act_absmax(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """max|X_j| of every Linear's input over the tokens of `ids`, keyed by full module name."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(m, args, out, name=name):
                a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
                stats[name] = torch.maximum(stats[name], a) if name in stats else a
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return stats


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothing_every_layer_leaves_float_logits_unchanged(alpha: float) -> None:
    model = tiny_model_with_outliers()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    stats = collect_act_absmax(model, ids)
    with torch.no_grad():
        before = model(ids).logits
    v_before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    for i, layer in enumerate(model.model.layers):
        smooth_decoder_layer(layer, LLAMA, stats, alpha, prefix=f"model.layers.{i}")
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.equal(v_before, model.model.layers[0].self_attn.v_proj.weight)  # v -> o was folded (GQA)
    assert rel_err(after, before) < 1e-4


def test_v_o_smoothing_is_exact_with_gqa_and_stats_keyed_relative_to_the_layer() -> None:
    model = tiny_model_with_outliers()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    stats = collect_act_absmax(model, ids)
    rel = {k.removeprefix("model.layers.1."): v for k, v in stats.items() if k.startswith("model.layers.1.")}
    x, kw = capture_block_inputs(model, ids, 1)
    layer = model.model.layers[1]
    with torch.no_grad():
        y0 = layer(x, **kw)
        s = smooth_decoder_layer(layer, LLAMA, rel, 1.0)
        y1 = layer(x, **kw)
    assert s["self_attn.v_proj"].shape == (2 * 16,)  # one scale per v row (num_kv_heads * head_dim)
    assert rel_err(y1, y0) < 1e-4


def test_gqa_column_index_repeats_kv_rows_over_their_heads() -> None:
    # 4 heads, 2 KV heads, head_dim 2: heads 0,1 read KV head 0 (rows 0,1), heads 2,3 read rows 2,3.
    assert gqa_column_index(4, 2, 2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert gqa_column_index(2, 2, 3).tolist() == [0, 1, 2, 3, 4, 5]


def test_smoothing_scales_formula_and_clamps() -> None:
    X = torch.tensor([4.0, 1.0, 0.0, 9.0])
    W = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(X, W, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))  # sqrt(4)/sqrt(1), sqrt(1)/sqrt(4)
    assert s[2:].tolist() == [1.0, 1.0]  # dead channel or zero weight: nothing to balance
    assert torch.allclose(smoothing_scales(X[:2], W[:2], 0.0), 1.0 / W[:2])
    assert torch.allclose(smoothing_scales(X[:2], W[:2], 1.0), X[:2])


def test_smoothquant_cuts_static_w8a8_error_on_outlier_channels() -> None:
    """Per-tensor static int8 X, per-channel int8 W: outliers crush the ordinary channels; smoothing fixes it."""
    torch.manual_seed(0)
    C = 64
    norm = nn.RMSNorm(C, eps=1e-6)
    with torch.no_grad():
        norm.weight[OUTLIER_CHANNELS] = 50.0
    linear = nn.Linear(C, 128)
    # Enough calibration tokens that the static scale covers the test range (no clipping).
    X_cal, X_test = torch.randn(4096, C), torch.randn(256, C)
    with torch.no_grad():
        Y = linear(norm(X_test))

        h_cal = norm(X_cal)
        naive = FakeW8A8Linear(linear, "tensor", act_scale=h_cal.abs().max() / 127)
        err_naive = (naive(norm(X_test)) - Y).pow(2).mean().item()

        norm_s, linear_s = copy.deepcopy(norm), copy.deepcopy(linear)
        s = smoothing_scales(h_cal.abs().amax(dim=0), weight_absmax([linear_s]), alpha=0.5)
        fold_smoothing(norm_s, [linear_s], s, name="norm")
        assert rel_err(linear_s(norm_s(X_test)), Y) < 1e-5  # the fold is exact in float
        smoothed = FakeW8A8Linear(linear_s, "tensor", act_scale=norm_s(X_cal).abs().max() / 127)
        err_smooth = (smoothed(norm_s(X_test)) - Y).pow(2).mean().item()

    factor = err_naive / err_smooth
    print(f"\nSmoothQuant alpha=0.5, static per-tensor W8A8: MSE naive {err_naive:.3e}, "
          f"smoothed {err_smooth:.3e}, reduction {factor:.1f}x")
    assert factor > 5


def _search_case():
    """Block 0 of the outlier-planted tiny model, its inputs, the input absmax and a 5-point grid."""
    model = tiny_model_with_outliers()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    x, kw = capture_block_inputs(model, ids, 0)
    return model.model.layers[0], x, kw, collect_act_absmax(model, ids), (0.0, 0.25, 0.5, 0.75, 1.0)


def test_search_alpha_beats_no_smoothing_on_a_decoder_layer() -> None:
    layer, x, kw, stats, grid = _search_case()
    errors = alpha_errors(layer, x, kw, stats, apply_fake_w8a8, grid, prefix="model.layers.0", names=LLAMA)
    alpha = best_alpha(errors)
    print(f"\nblock output MSE per alpha: { {a: f'{e:.3e}' for a, e in errors.items()} }, chosen {alpha}")
    assert errors[alpha] < errors[0.0]
    with pytest.raises(RecipeError, match="alpha"):  # the grid is checked before any trial
        alpha_errors(layer, x, kw, stats, apply_fake_w8a8, (0.5, 1.5), prefix="model.layers.0", names=LLAMA)
    assert set(ALPHA_GRID) >= set(grid) and len(ALPHA_GRID) == 21


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_a_recipe_error(alpha: float) -> None:
    with pytest.raises(RecipeError, match="alpha"):
        smoothing_scales(torch.ones(4), torch.ones(4), alpha)
    model = tiny_model_with_outliers()
    with pytest.raises(RecipeError, match="alpha"):
        smooth_decoder_layer(model.model.layers[0], LLAMA, {}, alpha)


def test_unfoldable_norm_is_a_recipe_error_naming_the_module() -> None:
    model = tiny_model_with_outliers()
    stats = collect_act_absmax(model, torch.randint(0, 256, (1, 8)))
    layer = model.model.layers[0]
    layer.input_layernorm = nn.Identity()
    with pytest.raises(RecipeError, match=r"^model\.layers\.0\.input_layernorm: cannot fold smoothing into Identity$"):
        smooth_decoder_layer(layer, LLAMA, stats, 0.5, prefix="model.layers.0")

    layer = model.model.layers[1]
    del layer.mlp.gate_proj
    w = layer.input_layernorm.weight.detach().clone()
    with pytest.raises(RecipeError, match=r"model\.layers\.1\.mlp\.gate_proj"):
        smooth_decoder_layer(layer, LLAMA, stats, 0.5, prefix="model.layers.1")
    assert torch.equal(layer.input_layernorm.weight, w)  # refused before the first fold


def test_fold_handles_layernorm_bias_and_gemma_style_unit_offset_norms() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    s = torch.rand(16) * 4 + 0.25
    for norm in (nn.LayerNorm(16), GemmaRMSNorm(16)):
        with torch.no_grad():
            norm.weight.normal_()
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_()
        lin = nn.Linear(16, 8)
        with torch.no_grad():
            y0 = lin(norm(x))
            fold_smoothing(norm, [lin], s, name=type(norm).__name__)
            y1 = lin(norm(x))
        assert rel_err(y1, y0) < 1e-5, type(norm).__name__


def test_token_relative_error_weighs_every_token_the_same() -> None:
    """A massive-activation token (norm 1000x) decides plain MSE but not the per-token relative error."""
    from quantmill.solvers.smoothquant import output_error

    ref = torch.ones(1, 4, 8)
    ref[0, 0] *= 1000.0
    big_token_off = ref.clone()
    big_token_off[0, 0] *= 1.01  # 1% error on the massive token only
    small_tokens_off = ref.clone()
    small_tokens_off[0, 1:] *= 1.5  # 50% error on every ordinary token
    assert output_error(ref, big_token_off) > output_error(ref, small_tokens_off)  # mse, the default
    assert output_error(ref, big_token_off, "token_relative") < output_error(ref, small_tokens_off, "token_relative")
    assert output_error(ref, small_tokens_off, "token_relative") == pytest.approx(3 / 4 * 0.25)
    with pytest.raises(ValueError, match="search error"):
        output_error(ref, ref, "l1")


def _smoothed_layer(alpha, seed: int = 0):
    model = tiny_model_with_outliers(seed)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    stats = collect_act_absmax(model, ids)
    layer = model.model.layers[0]
    smooth_decoder_layer(layer, LLAMA, stats, alpha, prefix="model.layers.0")
    return layer


def test_per_fold_alphas_all_equal_to_a_shared_alpha_fold_identically() -> None:
    shared = _smoothed_layer(0.6)
    per_fold = _smoothed_layer({fold: 0.6 for fold in fold_names(LLAMA)})
    for (name, a), (_, b) in zip(shared.state_dict().items(), per_fold.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_fold_without_an_alpha_is_a_recipe_error_naming_it() -> None:
    with pytest.raises(RecipeError, match=r"no smoothquant alpha for fold 'self_attn\.v_proj'"):
        _smoothed_layer({"input_layernorm": 0.5, "post_attention_layernorm": 0.5})


def test_per_fold_search_is_never_worse_than_the_best_shared_alpha() -> None:
    layer, x, kw, stats, grid = _search_case()
    folds = fold_names(LLAMA)
    best, info = search_fold_alphas(
        layer, x, kw, folds, apply_fake_w8a8,
        lambda trial, a: smooth_decoder_layer(trial, LLAMA, stats, a, prefix="model.layers.0"), grid,
    )
    shared = alpha_errors(layer, x, kw, stats, apply_fake_w8a8, grid, prefix="model.layers.0", names=LLAMA)
    print(f"\nper-fold alphas {best}: block MSE {info['error']:.3e} vs best shared {min(shared.values()):.3e}")
    assert set(best) == set(folds) and all(a in grid for a in best.values())
    assert info["shared"] == pytest.approx(shared)  # the first sweep is the shared search
    assert info["error"] <= info["shared_error"] == min(shared.values())
    trial = copy.deepcopy(layer)  # the reported error is that of the returned alphas
    smooth_decoder_layer(trial, LLAMA, stats, best, prefix="model.layers.0")
    from quantmill.solvers.smoothquant import block_output, output_error

    err = output_error(block_output(layer, x, kw), block_output(apply_fake_w8a8(trial), x, kw))
    assert err == pytest.approx(info["error"], rel=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_search_models_the_quantized_module_it_searches_for(symmetric: bool) -> None:
    # The alpha search scores FakeW8A8Linear; what runs is QuantLinear (per-channel int8 weights,
    # int8 inputs per token, symmetric or with a zero point). Same numbers, or the search would
    # optimise for a different model.
    from quantmill.nn.quant_linear import QuantLinear, QuantScheme

    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(3, 10, 64)
    x[..., 5] -= 20.0  # a one-sided outlier channel: where a zero point pays
    scheme = QuantScheme(act="dynamic", act_symmetric=symmetric)
    expected = QuantLinear.from_linear(linear, scheme, path="fake")(x)
    got = FakeW8A8Linear(linear, "token", symmetric=symmetric)(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    if not symmetric:
        sym = FakeW8A8Linear(linear, "token")(x)
        exact = linear(x)
        assert (got - exact).pow(2).mean() < 0.5 * (sym - exact).pow(2).mean()
