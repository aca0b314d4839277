"""Checkpoints: every weight-only recipe saves in the compressed-tensors layout, transformers loads
it, and quantmill's own loader gives the same logits as the in-memory fake-quantized model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantmill.core.errors import RecipeError
from quantmill.io.checkpoint import load_quantized, save_quantized, size_report
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext, layer_granularity, target_linears
from quantmill.methods.recipe import Recipe
from quantmill.methods.recipe_files import builtin_recipes, load_recipe
from quantmill.methods.registry import REGISTRY

# Weight-only RTN recipes; the W8A8 / FP8 ones (rtn with `activations`) are in test_activation_schemes.py.
RTN = [name for name in builtin_recipes() if load_recipe(name).method == "rtn" and load_recipe(name).activations is None]


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _quantize(folder: Path, recipe: Recipe):
    model = load_model(folder)
    result = REGISTRY[recipe.method].run(MethodContext(model, recipe, {}, _ids(), torch.device("cpu")))
    return model, result


def _tiny_recipe(name: str) -> Recipe:
    recipe = load_recipe(name)
    if recipe.weights.group_size == 64:  # the tiny model is 64 wide: use groups of 32
        recipe = recipe.model_copy(update={"weights": recipe.weights.model_copy(update={"group_size": 32})})
    return recipe


@pytest.mark.parametrize("name", RTN)
def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(tiny_model, tmp_path, name):
    from transformers import AutoModelForCausalLM

    recipe = _tiny_recipe(name)
    model, result = _quantize(tiny_model, recipe)
    fake = load_model(tiny_model)
    mods = dict(fake.named_modules())
    for module, qw in result.weights.items():
        mods[module].weight.data.copy_(qw.dequantize())
    save_quantized(model, result.weights, recipe, tmp_path / "q", {"recipe": recipe.name})
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ours = load_quantized(tmp_path / "q")
    with torch.no_grad():
        a, b, c = served(_ids()).logits, ours(_ids()).logits, fake(_ids()).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (b - c).abs().max().item() < 1e-5
    assert (tmp_path / "q" / "recipe.yaml").is_file() and (tmp_path / "q" / "quantmill.json").is_file()
    report = size_report(tmp_path / "q")
    assert report["quantized_weights"] == sum(m.weight.numel() for m in target_linears(load_model(tiny_model), recipe).values())
    assert recipe.weights.bits <= report["bits_per_weight"] < 33


def test_indivisible_group_size_names_the_layers(tiny_model):
    recipe = load_recipe("w4a16-rtn-g64").model_copy(update={"weights": load_recipe("w4a16-rtn-g64").weights.model_copy(update={"group_size": 48})})
    linears = target_linears(load_model(tiny_model), recipe)
    with pytest.raises(RecipeError, match=r"group size 48 does not divide .*model\.layers\.0\.self_attn\.q_proj \(64\)"):
        layer_granularity(recipe, linears)


def test_indivisible_layers_can_stay_per_channel(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    base = load_recipe("w4a16-rtn-g64")
    # 64 divides the 128-wide down_proj input but not the 64-wide others... use 128: only down_proj is grouped.
    recipe = base.model_copy(update={"weights": base.weights.model_copy(update={"group_size": 128, "indivisible": "channel"})})
    plan = layer_granularity(recipe, target_linears(load_model(tiny_model), recipe))
    assert plan["model.layers.0.mlp.down_proj"] == ("group", 128)
    assert plan["model.layers.0.self_attn.q_proj"] == ("channel", None)
    model, result = _quantize(tiny_model, recipe)
    save_quantized(model, result.weights, recipe, tmp_path / "q", {})
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        assert (served(_ids()).logits - load_quantized(tmp_path / "q")(_ids()).logits).abs().max() < 1e-4


def test_release_weights_empties_the_dict_and_writes_the_same_checkpoint(tiny_model, tmp_path):
    """The quantize stage frees the integer copies before compressing; the files must not change."""
    from safetensors.torch import load_file

    recipe = _tiny_recipe("w4a16-rtn-g64")
    model, result = _quantize(tiny_model, recipe)
    save_quantized(model, result.weights, recipe, tmp_path / "kept", {})
    model, result = _quantize(tiny_model, recipe)
    assert all(qw.q.dtype == torch.int8 for qw in result.weights.values())  # int codes held as int8
    save_quantized(model, result.weights, recipe, tmp_path / "released", {}, release_weights=True)
    assert result.weights == {}
    kept, released = load_file(tmp_path / "kept" / "model.safetensors"), load_file(tmp_path / "released" / "model.safetensors")
    assert kept.keys() == released.keys() and all(torch.equal(kept[k], released[k]) for k in kept)


def test_every_registered_method_has_a_checkpoint_writer():
    """The writer is chosen by the registry entry's format: a new method names a format, and
    every format has exactly one writer."""
    from quantmill.io.checkpoint import WRITERS
    from quantmill.methods.registry import REGISTRY

    assert {m.checkpoint_format for m in REGISTRY.values()} <= set(WRITERS)


def test_no_checkpoint_module_dispatches_on_a_method_name():
    """`recipe.method == "llm_int8"` in a writer or reader is what the registry's
    `checkpoint_format` replaced; this keeps it from coming back."""
    import ast

    io = Path(__file__).resolve().parent.parent / "quantmill" / "io"
    for path in io.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                named = any(isinstance(s, ast.Attribute) and s.attr == "method" for s in sides)
                literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
                assert not (named and literal), f"{path.name}:{node.lineno} compares a method name"
