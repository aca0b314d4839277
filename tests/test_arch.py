"""The architecture table: it names every Linear of each architecture's block in forward order,
its folds name real modules, GPT-2 (Conv1D) is refused in one line, and blocks without a Linear
are an error rather than a quantization of nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantmill.core.errors import RecipeError, SourceError
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext, target_linears
from quantmill.methods.recipe_files import load_recipe
from quantmill.methods.registry import REGISTRY
from quantmill.model.arch import ARCHITECTURES, block_folds, decoder_layers, forward_order
from quantmill.model.stats import collect_stats
from tests.test_verify import _tiny_config
from tests.tiny import make_tiny_gpt2, make_tiny_llama

GPT2_REFUSAL = (
    "architecture 'gpt2' cannot be quantized: its blocks use transformers' Conv1D (weight stored [in, out]), "
    "not nn.Linear, and quantmill quantizes nn.Linear only"
)


def _tiny(model_type: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_tiny_config(model_type)).eval()


def _weight_modules(block: nn.Module) -> dict[str, nn.Module]:
    """The block's Linears, and GPT-2's Conv1D (the modules the table lists as the block's Linears)."""
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_the_table_lists_every_linear_of_a_block_in_forward_order(model_type: str) -> None:
    model = _tiny(model_type)
    names = ARCHITECTURES[model_type].block
    block = decoder_layers(model)[0]
    modules = _weight_modules(block)
    assert set(modules) == set(names.linears)
    called: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: called.append(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(torch.randint(0, 257, (1, 8)), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    assert called[: len(names.linears)] == list(names.linears)  # block 0's forward order
    for fold in names.folds:
        assert all(isinstance(block.get_submodule(c), nn.Linear) for c in fold.consumers)
        block.get_submodule(fold.producer)
        if fold.attention:
            block.get_submodule(fold.attention)
    assert set(names.no_clip) <= set(names.linears)


def test_gemma2_folds_the_mlp_input_through_pre_feedforward_layernorm() -> None:
    producers = [f.producer for f in ARCHITECTURES["gemma2"].block.folds_of("norm")]
    assert producers == ["input_layernorm", "pre_feedforward_layernorm"]


def test_gpt2_is_refused_in_one_line_naming_the_architecture_and_why(tmp_path) -> None:
    model = load_model(make_tiny_gpt2(tmp_path / "gpt2"))
    recipe = load_recipe("w4a16-rtn")
    with pytest.raises(SourceError) as got:
        target_linears(model, recipe)
    assert str(got.value) == GPT2_REFUSAL
    with pytest.raises(SourceError, match=r"^architecture 'gpt2' cannot be quantized: .*Conv1D"):
        collect_stats(model, torch.randint(0, 257, (8, 16)), torch.device("cpu"), batch_size=8, nbins=64)
    with pytest.raises(SourceError, match=r"^architecture 'gpt2' cannot be quantized: .*Conv1D"):
        REGISTRY["rtn"].run(MethodContext(model, recipe, {}, torch.randint(0, 257, (8, 16)), torch.device("cpu")))


def test_blocks_without_any_linear_are_an_error_not_an_empty_quantization(tmp_path) -> None:
    from transformers.pytorch_utils import Conv1D

    model = load_model(make_tiny_llama(tmp_path / "llama"))
    for block in decoder_layers(model):
        for name, linear in list(block.named_modules()):
            if isinstance(linear, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, Conv1D(linear.out_features, linear.in_features))
    with pytest.raises(SourceError, match=r"^architecture 'llama': the decoder blocks under model\.layers hold no nn\.Linear: nothing to quantize$"):
        target_linears(model, load_recipe("w4a16-rtn"))


@pytest.mark.parametrize("model_type", ["opt", "phi3"])
def test_fold_methods_refuse_an_architecture_without_folds_in_the_table(model_type: str) -> None:
    with pytest.raises(RecipeError, match=rf"^awq needs the norm -> Linear folds .* has none for '{model_type}'$"):
        block_folds(_tiny(model_type), "awq")


def test_forward_order_follows_the_architecture_the_names_belong_to() -> None:
    assert forward_order(["mlp.down_proj", "self_attn.q_proj"]) == ARCHITECTURES["llama"].block.linears
    assert forward_order(["self_attn.qkv_proj", "mlp.gate_up_proj"]) == ARCHITECTURES["phi3"].block.linears
    assert forward_order(["fc2", "fc1"])[-2:] == ("fc1", "fc2")


@pytest.mark.parametrize("model_type", ["opt", "phi3"])
@pytest.mark.parametrize("recipe", ["w4a16-rtn", "w4a16-gptq"])
def test_methods_without_folds_quantize_every_linear_the_table_lists(model_type: str, recipe: str) -> None:
    model = _tiny(model_type)
    ids = torch.randint(0, 257, (8, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, ids, torch.device("cpu"), batch_size=8, nbins=64)
    r = load_recipe(recipe)
    result = REGISTRY[r.method].run(MethodContext(model, r, stats, ids, torch.device("cpu")))
    arch = ARCHITECTURES[model_type]
    assert set(result.weights) == {f"{arch.layout.layers}.0.{n}" for n in arch.block.linears}  # order: registration
