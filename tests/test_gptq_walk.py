"""GPTQ over a whole (tiny) model: better than RTN, resumable bit-identically, saved loadably."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantmill.io.checkpoint import load_quantized, save_quantized
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext
from quantmill.methods.recipe_files import load_recipe
from quantmill.methods.registry import REGISTRY
from tests.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("gptq") / "m", layers=3)


def _calibration() -> torch.Tensor:
    # Correlated inputs, like text: a few repeated motifs rather than uniform noise.
    g = torch.Generator().manual_seed(0)
    motifs = torch.randint(0, 256, (6, 16), generator=g)
    return torch.stack([motifs[torch.randint(0, 6, (4,), generator=g)].reshape(-1) for _ in range(8)])


def _run(folder: Path, recipe: str, partial: Path | None = None, on_block_done=None, min_max: bool = False):
    model = load_model(folder)
    r = load_recipe(recipe)
    if min_max:  # plain min-max ranges: the recipe without its clipping search
        r = r.model_copy(update={"options": {k: v for k, v in r.options.items() if not k.startswith("clip_")}})
    ctx = MethodContext(model, r, {}, _calibration(), torch.device("cpu"), partial, on_block_done)
    return model, REGISTRY[ctx.recipe.method].run(ctx)


def _output_error(folder: Path, weights) -> float:
    ref = load_model(folder)
    model = load_model(folder)
    mods = dict(model.named_modules())
    for name, qw in weights.items():
        mods[name].weight.data.copy_(qw.dequantize())
    ids = _calibration()
    with torch.no_grad():
        return (model(ids).logits - ref(ids).logits).square().mean().item()


@pytest.mark.parametrize("rtn_recipe, gptq_recipe", [("w4a16-rtn", "w4a16-gptq"), ("fp8-dynamic-rtn", "fp8-dynamic")])
def test_gptq_beats_rtn_on_the_model_output(tiny, rtn_recipe, gptq_recipe):
    _, rtn = _run(tiny, rtn_recipe, min_max=True)  # the same min-max grid for both
    _, gptq = _run(tiny, gptq_recipe, min_max=True)
    err_rtn, err_gptq = _output_error(tiny, rtn.weights), _output_error(tiny, gptq.weights)
    print(f"{gptq_recipe} logit MSE: RTN {err_rtn:.3e}, GPTQ {err_gptq:.3e}")
    assert err_gptq < err_rtn
    assert {r["module"] for r in gptq.report} == set(gptq.weights)
    assert all(r["rel_output_error"] >= 0 for r in gptq.report)
    for name, qw in gptq.weights.items():  # the same grid as RTN's (int or e4m3), other roundings
        assert qw.q.dtype == rtn.weights[name].q.dtype and torch.equal(qw.scale, rtn.weights[name].scale), name


@pytest.mark.parametrize("recipe", ["w4a16-gptq-g64-actorder", "fp8-dynamic"])
def test_killed_after_block_k_resumes_bit_identically(tiny, tmp_path, recipe):
    _, whole = _run(tiny, recipe)  # uninterrupted reference

    class Killed(Exception):
        pass

    def die_after_block_0(i, n, meta):
        if i == 0:
            raise Killed

    partial = tmp_path / "partial"
    with pytest.raises(Killed):
        _run(tiny, recipe, partial, die_after_block_0)
    visited = []
    _, resumed = _run(tiny, recipe, partial, lambda i, n, meta: visited.append(i))
    assert visited == [1, 2]  # block 0 came from the partial folder
    assert resumed.weights.keys() == whole.weights.keys()
    for name in whole.weights:
        assert resumed.weights[name].q.dtype == whole.weights[name].q.dtype, name
        assert torch.equal(resumed.weights[name].q.float(), whole.weights[name].q.float()), name
        assert torch.equal(resumed.weights[name].scale, whole.weights[name].scale), name


@pytest.mark.parametrize("recipe", ["w4a16-gptq-g64-actorder", "w3a16-gptq-g64"])
def test_gptq_checkpoint_loads_in_transformers(tiny, tmp_path, recipe):
    from transformers import AutoModelForCausalLM

    recipe_ = load_recipe(recipe)
    if recipe_.weights.group_size and 64 % recipe_.weights.group_size:
        pytest.skip("group size does not fit the tiny model")
    model, result = _run(tiny, recipe)
    save_quantized(model, result.weights, recipe_, tmp_path / "q", {"recipe": recipe})
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ours = load_quantized(tmp_path / "q")
    ids = _calibration()[:1]
    with torch.no_grad():
        assert (served(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
