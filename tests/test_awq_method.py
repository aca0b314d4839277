"""AWQ as a recipe method on a tiny Llama: scale search + RTN or GPTQ per block, the usual
compressed-tensors checkpoint (transformers loads it), a bit-identical resume, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantmill.core.errors import RecipeError
from quantmill.io.checkpoint import load_quantized, save_quantized
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext
from quantmill.methods.recipe import Recipe
from quantmill.methods.recipe_files import load_recipe
from quantmill.methods.registry import REGISTRY
from tests.tiny import make_tiny_llama_with_outliers


@pytest.fixture(scope="module")
def salient(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers) with a few large input channels feeding every Linear, as in LLMs."""
    return make_tiny_llama_with_outliers(tmp_path_factory.mktemp("awq") / "m", [5, 21], 12.0)


def _calibration() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    motifs = torch.randint(0, 256, (6, 16), generator=g)
    return torch.stack([motifs[torch.randint(0, 6, (2,), generator=g)].reshape(-1) for _ in range(16)])


def _g32(name: str, **options) -> Recipe:
    """The built-in recipe with groups of 32 (the tiny model is 64 wide) and a coarser grid."""
    r = load_recipe(name)
    return r.model_copy(update={
        "weights": r.weights.model_copy(update={"group_size": 32}),
        "options": {**r.options, "grid": 10, **options},
    })


def _run(folder: Path, recipe: Recipe, partial: Path | None = None, on_block_done=None):
    model = load_model(folder)
    return model, REGISTRY[recipe.method].run(MethodContext(model, recipe, {}, _calibration(), torch.device("cpu"), partial, on_block_done))


def _logit_mse(model, reference) -> float:
    ids = _calibration()[:4]
    with torch.no_grad():
        return (model(ids).logits - reference(ids).logits).square().mean().item()


@pytest.mark.parametrize("name,baseline", [("w4a16-awq-g64", "w4a16-rtn-g64"), ("w4a16-awq-gptq-g64", "w4a16-gptq-g64")])
def test_awq_checkpoint_loads_in_transformers_and_beats_its_quantizer_alone(salient, tmp_path, name, baseline):
    from transformers import AutoModelForCausalLM

    recipe = _g32(name)
    model, result = _run(salient, recipe)
    assert {r["module"] for r in result.report} == set(result.weights)
    assert all(r["awq_search_error_ratio"] <= 1.0 for r in result.report)  # ratio 0 (plain RTN) is on the grid
    save_quantized(model, result.weights, recipe, tmp_path / "q", {"recipe": recipe.name}, tokenizer_dir=salient)
    ours = load_quantized(tmp_path / "q")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = _calibration()[:2]
    with torch.no_grad():
        assert (ours(ids).logits - served(ids).logits).abs().max().item() < 1e-4
    base = load_recipe(baseline)
    # Its quantizer alone: the baseline recipe with the AWQ recipe's own quantizer options (no
    # act-order, no clipping search, which the built-in baselines add since issue 21).
    plain = {k: v for k, v in base.options.items() if k not in ("actorder", "static_groups", "clip_search", "clip_grid", "clip_min_ratio")}
    base = base.model_copy(update={"weights": base.weights.model_copy(update={"group_size": 32}), "options": plain})
    base_model, base_result = _run(salient, base)
    save_quantized(base_model, base_result.weights, base, tmp_path / "base", {"recipe": base.name})
    reference = load_model(salient)
    err_awq, err_base = _logit_mse(ours, reference), _logit_mse(load_quantized(tmp_path / "base"), reference)
    print(f"{name}: logit MSE {err_awq:.3e} vs {baseline} {err_base:.3e}")
    assert err_awq < err_base


def test_awq_killed_after_block_0_resumes_bit_identically(salient, tmp_path):
    recipe = _g32("w4a16-awq-g64")
    _, whole = _run(salient, recipe)

    class Killed(Exception):
        pass

    def die(i, n, meta):
        if i == 0:
            raise Killed

    with pytest.raises(Killed):
        _run(salient, recipe, tmp_path / "partial", die)
    visited = []
    model, resumed = _run(salient, recipe, tmp_path / "partial", lambda i, n, meta: visited.append(i))
    assert visited == [1]
    for name, qw in whole.weights.items():
        assert torch.equal(resumed.weights[name].q, qw.q), name
        assert torch.equal(resumed.weights[name].scale, qw.scale), name
    # The folds changed the norms of block 0; the resume restored them from the partial folder.
    fresh = load_model(salient)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, fresh.model.layers[0].input_layernorm.weight)


def test_awq_refuses_bad_options_and_schemes(salient):
    with pytest.raises(RecipeError, match="awq quantizer must be 'rtn' or 'gptq'"):
        _run(salient, _g32("w4a16-awq-g64", quantizer="hqq"))
    with pytest.raises(RecipeError, match=r"\['percdamp'\] apply to quantizer: gptq only"):
        _run(salient, _g32("w4a16-awq-g64", percdamp=0.1))
    with pytest.raises(RecipeError, match=r"unknown awq option\(s\) \['alpha'\]"):
        _run(salient, _g32("w4a16-awq-g64", alpha=0.5))
    with pytest.raises(RecipeError, match="granularity group"):
        _run(salient, load_recipe("w4a16-awq-g64").model_copy(update={"weights": load_recipe("w4a16-rtn").weights}))


def test_awq_on_an_architecture_without_folds_in_the_table_is_refused_naming_it():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=257, max_position_embeddings=128, word_embed_proj_dim=64)).eval()
    with pytest.raises(RecipeError, match=r"awq needs the norm -> Linear folds of the decoder blocks; the architecture table \(quantmill/model/arch\.py\) has none for 'opt'$"):
        REGISTRY["awq"].run(MethodContext(model, _g32("w4a16-awq-g64"), {}, _calibration()[:8], torch.device("cpu")))
