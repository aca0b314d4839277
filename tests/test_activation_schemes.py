"""W8A8 / FP8 recipes end to end on a tiny Llama: quantize from the stats stage, save in the
compressed-tensors layout, load with quantmill (QuantLinear) and with transformers, compare.

What transformers does with these checkpoints on the CPU (transformers 5.24, compressed-tensors
0.20): `CompressedTensorsHfQuantizer` calls `apply_quantization_config(run_compressed=False)`, so
each Linear keeps compressed-tensors' wrapped forward, de-compresses its weight once and
fake-quantizes its *input* on every call (`forward_quantize(module, input, "input", ...)`). So
activation quantization does happen at run time there, in float. Static scales are read from the
checkpoint and fp8 dynamic scales are absmax / 448 as in QuantLinear: logits agree exactly. Int8
dynamic per-token grids differ: symmetric, compressed-tensors uses absmax / 127.5
(`calculate_qparams`: max / (bit_range / 2)) where QuantLinear and vLLM's int8 kernels use
absmax / 127; asymmetric, the scale and zero point are the same but compressed-tensors rounds
x / s + z in float32 where QuantLinear (and vLLM's azp kernel) rounds x / s and adds the integer z.
Those differences are the whole gap (the test swaps in compressed-tensors' grid and gets equality).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quantmill.core.errors import RecipeError, StatsError
from quantmill.core.qparams import compute_qparams
from quantmill.io.checkpoint import load_quantized, save_quantized
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext, target_linears
from quantmill.methods.recipe import Recipe
from quantmill.methods.recipe_files import builtin_recipes, load_recipe, parse_recipe
from quantmill.methods.registry import REGISTRY
from quantmill.methods.schemes import static_input_qparams
from quantmill.model.stats import collect_stats
from quantmill.nn.quant_linear import QuantLinear, compressed_tensors_dynamic_int8, fp8_matmul_available
from quantmill.solvers.observers import ActivationStats

# The rtn and gptq W8A8 / FP8 recipes (SmoothQuant's own W8A8 recipes are tested in its own files).
ACTIVATION_RECIPES = [n for n in builtin_recipes() if load_recipe(n).method in ("rtn", "gptq") and load_recipe(n).activations is not None]
ASYM = "w8a8-static-minmax-asym"


def _recipe(name: str) -> Recipe:
    if name == ASYM:
        base = load_recipe("w8a8-static-minmax")
        return base.model_copy(update={"name": ASYM, "activations": base.activations.model_copy(update={"symmetric": False})})
    return load_recipe(name)


def _ids(seed: int = 1, n: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_stats(tiny_model: Path) -> dict[str, ActivationStats]:
    return collect_stats(load_model(tiny_model), _ids(seed=7, n=8, length=32), torch.device("cpu"), batch_size=4, nbins=1024)


def _quantize_and_save(tiny_model: Path, recipe: Recipe, stats, dst: Path):
    model = load_model(tiny_model)
    result = REGISTRY[recipe.method].run(MethodContext(model, recipe, stats, _ids(), torch.device("cpu")))
    save_quantized(model, result.weights, recipe, dst, {"recipe": recipe.name}, input_qparams=result.input_qparams)
    return result


def _weight_only(tiny_model: Path, result) -> torch.nn.Module:
    """The float model with the de-quantized weights and float inputs (no activation quantization)."""
    model = load_model(tiny_model)
    modules = dict(model.named_modules())
    for name, qw in result.weights.items():
        modules[name].weight.data.copy_(qw.dequantize())
    return model


def test_the_activation_recipes_are_built_in() -> None:
    assert set(ACTIVATION_RECIPES) == {
        "w8a8-dynamic", "w8a8-dynamic-sym", "w8a8-static-minmax", "w8a8-static-pct9999", "w8a8-static-mse", "w8a8-static-kl",
        "fp8-dynamic", "fp8-dynamic-rtn", "fp8-static",
    }


@pytest.mark.parametrize("name", ACTIVATION_RECIPES + [ASYM])
def test_checkpoint_round_trip(tiny_model, tiny_stats, tmp_path, name, monkeypatch):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(name)
    a = recipe.activations
    fp8 = recipe.weights.type == "float"
    result = _quantize_and_save(tiny_model, recipe, tiny_stats, tmp_path / "q")

    # config.json: compressed-tensors format and input_activations args
    qconfig = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == ("float-quantized" if fp8 else "int-quantized")
    (group,) = qconfig["config_groups"].values()
    args = group["input_activations"]
    assert (args["type"], args["dynamic"], args["symmetric"]) == (a.type, a.dynamic, a.symmetric)
    assert args["strategy"] == ("token" if a.dynamic else "tensor")
    assert group["weights"]["type"] == recipe.weights.type

    # tensors: fp8 / int8 weights exactly as quantized; input_scale (+ zero point) only when static
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for module, qw in result.weights.items():
            stored = f.get_tensor(f"{module}.weight")
            assert stored.dtype == (torch.float8_e4m3fn if fp8 else torch.int8)
            assert torch.equal(stored.float(), qw.q.float())
            assert (f"{module}.input_scale" in keys) == (not a.dynamic)
            assert (f"{module}.input_zero_point" in keys) == (not a.dynamic and not a.symmetric)
            if not a.dynamic:
                scale, zero_point = result.input_qparams[module]
                assert f.get_tensor(f"{module}.input_scale").item() == pytest.approx(scale.item(), rel=1e-6)
                if not a.symmetric:
                    assert f.get_tensor(f"{module}.input_zero_point").item() == zero_point.item()
    assert len(result.input_qparams) == (0 if a.dynamic else len(result.weights))

    # quantmill's loader: every quantized Linear is a QuantLinear with the recipe's scheme
    ours = load_quantized(tmp_path / "q")
    loaded = dict(ours.named_modules())
    for module in result.weights:
        q = loaded[module]
        assert isinstance(q, QuantLinear) and q.path == "fake"
        assert q.scheme.act == ("dynamic" if a.dynamic else "static")
        assert q.scheme.act_type == ("fp8" if fp8 else "int") and q.scheme.act_symmetric == a.symmetric
        if not a.dynamic:
            assert q.input_scale.item() == pytest.approx(result.input_qparams[module][0].item(), rel=1e-6)
            assert q.input_zero_point.item() == result.input_qparams[module][1].item()

    served = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    weight_only = _weight_only(tiny_model, result)
    ids = _ids(seed=3)
    with torch.no_grad():
        ours_logits, served_logits, float_inputs = ours(ids).logits, served(ids).logits, weight_only(ids).logits
    act_effect = (ours_logits - float_inputs).abs().max().item()
    assert act_effect > 1e-4  # inputs really are quantized in quantmill's model
    gap = (served_logits - ours_logits).abs().max().item()
    if a.type == "int" and a.dynamic:
        # compressed-tensors' dynamic int8 grid differs from quantmill's (and vLLM's kernels'):
        # symmetric, its scale is absmax / 127.5, not / 127; asymmetric, it rounds x / s + z in
        # float32 where quantmill rounds x / s and adds the integer z (the two differ by one
        # step where x / s + z lands on a half in float32). With its grid we agree exactly.
        assert gap < 0.05 * ours_logits.abs().max().item()
        monkeypatch.setattr(QuantLinear, "fake_quantize_input", compressed_tensors_dynamic_int8)
        with torch.no_grad():
            gap = (served(ids).logits - ours(ids).logits).abs().max().item()
    assert gap < 1e-5, f"{name}: transformers vs quantmill max |logit diff| {gap:.3g}"


@pytest.mark.parametrize("name", ["w8a8-dynamic", "w8a8-dynamic-sym", "w8a8-static-mse", ASYM, "fp8-dynamic", "fp8-static"])
def test_int_path_equals_fake_path_on_a_loaded_model(tiny_model, tiny_stats, tmp_path, name):
    recipe = _recipe(name)
    if recipe.weights.type == "float" and not fp8_matmul_available("cpu"):
        pytest.skip("torch._scaled_mm has no fp8 kernel on this CPU build")
    _quantize_and_save(tiny_model, recipe, tiny_stats, tmp_path / "q")
    fake, real = load_quantized(tmp_path / "q"), load_quantized(tmp_path / "q", path="int")
    assert {m.path for m in real.modules() if isinstance(m, QuantLinear)} == {"int"}
    with torch.no_grad():
        a, b = fake(_ids(seed=4)).logits, real(_ids(seed=4)).logits
    # int8: exact int32 sums, only float rounding differs; fp8: a per-token scale 1 ulp apart can
    # move an e4m3 rounding, so allow a little more.
    tol = 2e-3 if recipe.weights.type == "float" else 1e-4
    assert (a - b).abs().max().item() <= tol * a.abs().max().item()


def test_static_ranges_come_from_the_observer_on_the_stored_stats(tiny_model, tiny_stats):
    recipe = load_recipe("w8a8-static-pct9999")
    names = list(target_linears(load_model(tiny_model), recipe))
    qparams, rows = static_input_qparams(recipe, tiny_stats, names)
    s = tiny_stats[names[0]]
    minmax = compute_qparams(torch.tensor(-float(s.absmax.max())), torch.tensor(float(s.absmax.max())), 8, True)[0]
    assert qparams[names[0]][0].item() < minmax.item()  # the 99.99th percentile clips the extremes
    assert 0 < rows[names[0]]["act_clipped_fraction"] <= 2e-4
    assert rows[names[0]]["act_rel_rmse"] > 0


# --------------------------------------------------------------------------- bad input


def _parse(activations: dict, weights: dict | None = None) -> Recipe:
    data = {"name": "bad", "method": "rtn", "weights": weights or {"bits": 8, "granularity": "channel"}, "activations": activations}
    return parse_recipe(data, "bad.yaml")


STATIC = {"dynamic": False, "granularity": "tensor"}
FP8_WEIGHTS = {"bits": 8, "type": "float", "granularity": "channel"}


@pytest.mark.parametrize(
    "activations, weights, message",
    [
        ({"bits": 4}, None, "activation bits must be 8 for int activations, got 4"),
        ({"bits": 16, "type": "float"}, FP8_WEIGHTS, "activation bits must be 8 for float activations, got 16"),
        ({**STATIC, "observer": "percentile", "observer_options": {"percentile": 0}}, None, r"percentile must be in \(0, 100\], got 0"),
        ({**STATIC, "observer": "percentile", "observer_options": {"percentile": 100.5}}, None, r"percentile must be in \(0, 100\], got 100.5"),
        ({**STATIC, "observer": "entropy"}, None, "unknown observer 'entropy'"),
        ({"dynamic": False}, None, "static activations have one scale per tensor: set granularity: tensor"),
        ({"granularity": "tensor"}, None, "dynamic activations are quantized per token"),
        ({"observer": "kl"}, None, "apply to static activations only"),
        ({"type": "float", "symmetric": False}, FP8_WEIGHTS, "fp8 activations are symmetric"),
        ({**STATIC, "type": "float", "observer": "mse"}, FP8_WEIGHTS, "models an integer grid"),
        ({"type": "float"}, None, "activations.type 'float' must match weights.type 'int'"),
        ({}, {"bits": 8, "type": "float", "granularity": "group", "group_size": 32}, "fp8 weights are symmetric, per tensor or per channel"),
    ],
)
def test_bad_activation_recipes_are_one_line_recipe_errors(activations, weights, message):
    with pytest.raises(RecipeError, match=message) as err:
        _parse(activations, weights)
    assert str(err.value).startswith("recipe bad.yaml: ") and "\n" not in str(err.value)


def test_percentile_100_is_allowed_and_equals_minmax(tiny_model, tiny_stats):
    recipe = _parse({**STATIC, "observer": "percentile", "observer_options": {"percentile": 100}})
    names = list(target_linears(load_model(tiny_model), recipe))
    ours, _ = static_input_qparams(recipe, tiny_stats, names)
    minmax, _ = static_input_qparams(load_recipe("w8a8-static-minmax"), tiny_stats, names)
    for name in names:
        assert ours[name][0].item() == pytest.approx(minmax[name][0].item(), rel=1e-2)


@pytest.mark.parametrize("name", ["w8a8-static-pct9999", "w8a8-static-mse", "w8a8-static-kl"])
def test_static_recipe_whose_stats_lack_the_histogram_is_a_stats_error(tiny_model, tiny_stats, name):
    no_hist = {k: ActivationStats(**{**vars(v), "hist": None}) for k, v in tiny_stats.items()}
    model = load_model(tiny_model)
    with pytest.raises(StatsError, match=rf"recipe {name}: observer '\w+' on model\.layers\.0\.\S+: activation stats have no histogram") as err:
        REGISTRY["rtn"].run(MethodContext(model, load_recipe(name), no_hist, _ids(), torch.device("cpu")))
    assert "\n" not in str(err.value)
    # min-max needs no histogram
    assert REGISTRY["rtn"].run(MethodContext(model, load_recipe("w8a8-static-minmax"), no_hist, _ids(), torch.device("cpu"))).input_qparams


def test_static_recipe_without_stats_for_a_module_is_a_stats_error(tiny_model, tiny_stats):
    partial = {k: v for k, v in tiny_stats.items() if "down_proj" not in k}
    with pytest.raises(StatsError, match=r"the stats stage has none for 2 of them \(model\.layers\.0\.mlp\.down_proj"):
        REGISTRY["rtn"].run(MethodContext(load_model(tiny_model), load_recipe("w8a8-static-kl"), partial, _ids(), torch.device("cpu")))


def test_a_method_that_ignores_static_activations_is_refused_at_save(tiny_model, tiny_stats, tmp_path):
    recipe = load_recipe("w8a8-static-minmax")
    model = load_model(tiny_model)
    result = REGISTRY["rtn"].run(MethodContext(model, recipe, tiny_stats, _ids(), torch.device("cpu")))
    with pytest.raises(RecipeError, match="gave no static input scale for 14 module"):
        save_quantized(model, result.weights, recipe, tmp_path / "q", {})
    assert not (tmp_path / "q").exists()


def test_a_static_gptq_recipe_gets_the_observer_input_scales_of_rtn(tiny_model, tiny_stats):
    # GPTQ changes the weights only: the static input scales are the observer's, as for rtn.
    rtn = load_recipe("w8a8-static-mse")
    gptq = rtn.model_copy(update={"name": "w8a8-static-mse-gptq", "method": "gptq"})
    by_rtn = REGISTRY["rtn"].run(MethodContext(load_model(tiny_model), rtn, tiny_stats, _ids(), torch.device("cpu")))
    by_gptq = REGISTRY["gptq"].run(MethodContext(load_model(tiny_model), gptq, tiny_stats, _ids(), torch.device("cpu")))
    assert by_gptq.input_qparams.keys() == by_rtn.input_qparams.keys() == by_gptq.weights.keys()
    for name, (scale, zero_point) in by_rtn.input_qparams.items():
        assert torch.equal(by_gptq.input_qparams[name][0], scale) and torch.equal(by_gptq.input_qparams[name][1], zero_point)
    rows = {r["module"]: r for r in by_gptq.report}
    assert all("act_rel_rmse" in rows[name] for name in by_gptq.weights)
