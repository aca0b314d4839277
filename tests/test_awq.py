"""AWQ: exact scale folding, lower W4 error than plain RTN on salient channels, auto-clip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quantmill.core.errors import RecipeError
from quantmill.core.grid import IntGrid
from quantmill.core.qparams import quantize_weight_rtn
from quantmill.model.arch import ARCHITECTURES
from quantmill.solvers.awq import apply_awq_to_layer, awq_search_scales, capture_linear_inputs, clip_search
from tests.tiny import capture_block_inputs

LLAMA = ARCHITECTURES["llama"].block  # the block names the method passes in
LINEARS = LLAMA.linears
SALIENT = [3, 17, 40]
BITS, GROUP = 4, 32


def tiny_model_with_salient_channels(seed: int = 0) -> LlamaForCausalLM:
    """Tiny GQA Llama (4 heads, 2 KV heads) whose norms give a few channels ~50x activations."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[SALIENT] *= 50.0
            layer.post_attention_layernorm.weight[SALIENT[:2]] *= 50.0
    return model


def rtn_layer_(layer: nn.Module) -> nn.Module:
    """Replace each Linear's weight by its W4 g32 asymmetric RTN de-quantization, in place."""
    with torch.no_grad():
        for name in LINEARS:
            lin = layer.get_submodule(name)
            lin.weight.copy_(quantize_weight_rtn(lin.weight, IntGrid.for_weights(BITS, False), "group", GROUP).dequantize())
    return layer


def layer_output(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    with torch.no_grad():
        y = layer(x, **kw)
    return y[0] if isinstance(y, tuple) else y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_scales_folded_into_every_layer_leave_float_logits_unchanged(symmetric: bool) -> None:
    model = tiny_model_with_salient_channels()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    reports = []
    for i, layer in enumerate(model.model.layers):
        x, kw = capture_block_inputs(model, ids, i)
        reports.append(apply_awq_to_layer(layer, LLAMA, x, kw, BITS, GROUP, symmetric, grid=10, prefix=f"model.layers.{i}"))
    with torch.no_grad():
        after = model(ids).logits
    assert rel_err(after, before) < 1e-4
    assert set(reports[0]["scales"]) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    assert reports[0]["scales"]["input_layernorm"]["ratio"] > 0  # salient channels: some scaling was chosen


def test_awq_then_rtn_beats_plain_rtn_on_a_layer_with_salient_channels() -> None:
    model = tiny_model_with_salient_channels()
    g = torch.Generator().manual_seed(2)
    ids_cal, ids_test = torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)
    x_cal, kw_cal = capture_block_inputs(model, ids_cal, 0)
    x_test, kw_test = capture_block_inputs(model, ids_test, 0)
    layer = model.model.layers[0]
    Y = layer_output(layer, x_test, kw_test)

    plain = rtn_layer_(copy.deepcopy(layer))
    awq = copy.deepcopy(layer)
    report = apply_awq_to_layer(awq, LLAMA, x_cal, kw_cal, BITS, GROUP, symmetric=False)
    rtn_layer_(awq)
    err_rtn = (layer_output(plain, x_test, kw_test) - Y).pow(2).mean().item()
    err_awq = (layer_output(awq, x_test, kw_test) - Y).pow(2).mean().item()
    ratios = {k: v["ratio"] for k, v in report["scales"].items()}
    print(f"\nW4 g32 block output MSE (held-out tokens): plain RTN {err_rtn:.3e}, AWQ+RTN {err_awq:.3e}, "
          f"reduction {err_rtn / err_awq:.1f}x; ratios {ratios}")
    assert err_awq < err_rtn


def test_search_ratio_zero_is_plain_rtn_and_the_best_is_no_worse() -> None:
    # Three seeded layers: on the full 16-level grid (issue 21) plain RTN is already the best
    # ratio for seed 0's layer; seeds 1 and 2 gain 11% and 9%.
    improved = 0
    for seed in range(3):
        torch.manual_seed(seed)
        lin = nn.Linear(64, 96, bias=False)
        X = torch.randn(256, 64)
        X[:, SALIENT] *= 30.0
        s, errors = awq_search_scales([lin], X, X.abs().mean(dim=0), BITS, GROUP, symmetric=True, grid=20)
        W_rtn = quantize_weight_rtn(lin.weight.detach(), IntGrid.for_weights(BITS, True), "group", GROUP).dequantize()
        err_rtn = (X @ W_rtn.t() - X @ lin.weight.detach().t()).pow(2).mean().item()
        assert len(errors) == 20
        assert errors[0] == pytest.approx(err_rtn, rel=1e-5)
        assert min(errors) <= errors[0]
        if min(errors) < errors[0]:
            improved += 1
            assert s[SALIENT].min() > s.median()  # salient input channels are scaled up
        assert (s.max() * s.min()).sqrt().item() == pytest.approx(1.0, rel=1e-5)
    assert improved >= 2


def test_clip_search_shrinks_groups_with_a_stray_large_weight() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        lin.weight[:, 7] = 1.5  # one huge column: its groups' grids are wasted on it
    X = torch.randn(512, 64)
    X[:, 7] *= 0.01  # ... and it barely matters for the output
    W0 = lin.weight.detach().clone()
    ratios = clip_search(lin, X, BITS, GROUP, symmetric=True, grid=20)
    assert ratios.shape == (16, 2)
    assert ((ratios > 0.5) & (ratios <= 1.0)).all()
    assert ratios[:, 0].max() < 1.0  # every group 0 (holding column 7) is clipped
    assert lin.weight.abs().max() < W0.abs().max()

    def q_err(W: torch.Tensor) -> float:
        Q = quantize_weight_rtn(W, IntGrid.for_weights(BITS, True), "group", GROUP).dequantize()
        return (X @ Q.t() - X @ W0.t()).pow(2).mean().item()

    assert q_err(lin.weight.detach()) < q_err(W0)


def test_apply_awq_with_clip_reports_clip_ratios_without_q_k() -> None:
    model = tiny_model_with_salient_channels()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    x, kw = capture_block_inputs(model, ids, 0)
    report = apply_awq_to_layer(model.model.layers[0], LLAMA, x, kw, BITS, GROUP, symmetric=False, grid=10, clip=True)
    assert set(report["clip"]) == set(LINEARS) - {"self_attn.q_proj", "self_attn.k_proj"}
    assert all(0.5 < r <= 1.0 for r in report["clip"].values())


def test_capture_linear_inputs_sees_every_token() -> None:
    model = tiny_model_with_salient_channels()
    ids = torch.randint(0, 256, (2, 16))
    x, kw = capture_block_inputs(model, ids, 0)
    feats = capture_linear_inputs(model.model.layers[0], ["self_attn.o_proj", "mlp.down_proj"], x, kw)
    assert feats["self_attn.o_proj"].shape == (32, 64) and feats["mlp.down_proj"].shape == (32, 128)


def test_group_size_that_does_not_divide_is_a_recipe_error() -> None:
    model = tiny_model_with_salient_channels()
    ids = torch.randint(0, 256, (1, 8))
    x, kw = capture_block_inputs(model, ids, 0)
    before = copy.deepcopy(model.model.layers[0].state_dict())
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.self_attn\.q_proj: group_size 48 does not divide"):
        apply_awq_to_layer(model.model.layers[0], LLAMA, x, kw, BITS, 48, symmetric=False, prefix="model.layers.0")
    after = model.model.layers[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before the first fold
