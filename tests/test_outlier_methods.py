"""LLM.int8() and SmoothQuant as recipe methods on a tiny Llama: quantize, save, load back (and
through transformers where the format allows), resume, and refuse bad input with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from quantmill.core.errors import RecipeError, StatsError
from quantmill.io.checkpoint import load_quantized, save_quantized, size_report
from quantmill.io.llm_int8_checkpoint import FORMAT, WEIGHTS_FILE
from quantmill.io.sources import load_model
from quantmill.methods.base import MethodContext
from quantmill.methods.llm_int8 import llm_int8_outlier_fractions
from quantmill.methods.recipe import Recipe
from quantmill.methods.recipe_files import load_recipe
from quantmill.methods.registry import REGISTRY
from quantmill.methods.smoothquant import smooth_layer
from quantmill.model.arch import ARCHITECTURES
from quantmill.model.stats import collect_stats
from quantmill.nn.llm_int8 import LLMInt8Linear
from tests.tiny import make_tiny_llama_with_outliers

OUTLIER_CHANNELS = [3, 17, 40]


def _ids(seed: int = 1, n: int = 16, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A tiny Llama whose residual stream has outlier channels (norm weights x 40 there), as LLMs do."""
    return make_tiny_llama_with_outliers(tmp_path_factory.mktemp("outliers") / "m", OUTLIER_CHANNELS, 40.0)


@pytest.fixture(scope="module")
def stats(planted):
    return collect_stats(load_model(planted), _ids(), torch.device("cpu"), batch_size=8, nbins=1024)


def _with(recipe: Recipe | str, **options) -> Recipe:
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    return recipe.model_copy(update={"options": {**recipe.options, **options}})


def _run(folder: Path, recipe: Recipe, stats, partial: Path | None = None, on_block_done=None):
    model = load_model(folder)
    return model, REGISTRY[recipe.method].run(MethodContext(model, recipe, stats, _ids(), torch.device("cpu"), partial, on_block_done))


def _save(folder: Path, recipe: Recipe, stats, dst: Path):
    model, result = _run(folder, recipe, stats)
    save_quantized(model, result.weights, recipe, dst, {"recipe": recipe.name}, tokenizer_dir=folder, input_qparams=result.input_qparams)
    return result


def _rel_logit_error(model: nn.Module, reference: nn.Module) -> float:
    ids = _ids(seed=5, n=2)
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- LLM.int8()


@pytest.mark.parametrize("name, zero_point", [("w8-llmint8-t6", True), ("w8-llmint8-t6-absmax", False)])
def test_llm_int8_checkpoint_round_trips_into_llm_int8_modules(planted, stats, tmp_path, name, zero_point):
    recipe = load_recipe(name)
    result = _save(planted, recipe, stats, tmp_path / "q")
    lineage = json.loads((tmp_path / "q" / "quantmill.json").read_text())
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert lineage["format"] == FORMAT and lineage["llm_int8_threshold"] == 6.0
    assert lineage["llm_int8_inputs"] == ("zeropoint" if zero_point else "absmax")
    assert config["quantization_config"]["quant_method"] == FORMAT and config["quantization_config"]["threshold"] == 6.0
    assert config["quantization_config"]["input_activations"]["symmetric"] is not zero_point
    assert (tmp_path / "q" / WEIGHTS_FILE).is_file() and not (tmp_path / "q" / "model.safetensors").exists()

    loaded = load_quantized(tmp_path / "q")
    modules = {n: m for n, m in loaded.named_modules() if isinstance(m, LLMInt8Linear)}
    assert set(modules) == set(result.weights)  # every decoder Linear, lm_head excluded
    for name, m in modules.items():
        assert m.weight.dtype == torch.int8 and m.threshold.item() == 6.0 and bool(m.input_zero_point) is zero_point
        assert torch.equal(m.weight, result.weights[name].q.to(torch.int8))
    # The same numbers as converting the float model in memory.
    reference = load_model(planted)
    in_memory = load_model(planted)
    for name in result.weights:
        parent, _, child = name.rpartition(".")
        setattr(in_memory.get_submodule(parent), child, LLMInt8Linear.from_linear(in_memory.get_submodule(name), 6.0, zero_point=zero_point))
    ids = _ids(seed=5, n=2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)
    assert _rel_logit_error(loaded, reference) < 0.05
    fractions = llm_int8_outlier_fractions(loaded)
    assert set(fractions) == set(result.weights)
    # q/k/v and gate/up read the planted channels: those columns went through the float path.
    assert fractions["model.layers.0.self_attn.q_proj"] >= len(OUTLIER_CHANNELS) / 64
    report = {r["module"]: r for r in result.report}
    assert report["model.layers.0.self_attn.q_proj"]["calib_outlier_columns"] >= len(OUTLIER_CHANNELS)
    assert 8.0 < size_report(tmp_path / "q")["bits_per_weight"] < 9.0


def test_llm_int8_beats_naive_static_w8a8_on_outlier_channels(planted, stats, tmp_path):
    reference = load_model(planted)
    _save(planted, load_recipe("w8-llmint8-t6"), stats, tmp_path / "int8")
    _save(planted, load_recipe("w8a8-static-minmax"), stats, tmp_path / "naive")
    err_int8 = _rel_logit_error(load_quantized(tmp_path / "int8"), reference)
    err_naive = _rel_logit_error(load_quantized(tmp_path / "naive"), reference)
    print(f"relative logit error: naive static W8A8 {err_naive:.4f}, LLM.int8() {err_int8:.4f} ({err_naive / err_int8:.1f}x)")
    assert err_int8 * 3 < err_naive


def test_an_llm_int8_checkpoint_without_the_zero_point_flag_loads_as_absmax(planted, stats, tmp_path):
    # Checkpoints written before the zeropoint variant hold no `<name>.input_zero_point`: take a
    # zeropoint checkpoint, drop the flags, and it must load and compute as the absmax one.
    from safetensors.torch import load_file, save_file

    _save(planted, load_recipe("w8-llmint8-t6"), stats, tmp_path / "zp")
    _save(planted, load_recipe("w8-llmint8-t6-absmax"), stats, tmp_path / "absmax")
    ids = _ids(seed=6, n=2)
    with torch.no_grad():
        zp_logits = load_quantized(tmp_path / "zp")(ids).logits
        absmax_logits = load_quantized(tmp_path / "absmax")(ids).logits
        assert not torch.equal(zp_logits, absmax_logits)
        path = tmp_path / "zp" / WEIGHTS_FILE
        save_file({k: v for k, v in load_file(path).items() if not k.endswith(".input_zero_point")}, path, metadata={"format": "pt"})
        old = load_quantized(tmp_path / "zp")
        assert not any(bool(m.input_zero_point) for m in old.modules() if isinstance(m, LLMInt8Linear))
        assert torch.equal(old(ids).logits, absmax_logits)


def test_transformers_refuses_the_llm_int8_folder_instead_of_loading_integers_as_floats(planted, stats, tmp_path):
    from transformers import AutoModelForCausalLM

    _save(planted, load_recipe("w8-llmint8-t6"), stats, tmp_path / "q")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("threshold", [0, -1.0, float("nan"), "six", True])
def test_llm_int8_threshold_must_be_positive(planted, stats, threshold):
    with pytest.raises(RecipeError, match=r"w8-llmint8-t6: llm_int8 threshold must be a number > 0"):
        _run(planted, _with("w8-llmint8-t6", threshold=threshold), stats)


def test_llm_int8_refuses_other_weight_schemes_activations_and_unknown_options(planted, stats):
    base = load_recipe("w8-llmint8-t6")
    with pytest.raises(RecipeError, match="per output channel"):
        _run(planted, base.model_copy(update={"weights": load_recipe("w4a16-rtn").weights}), stats)
    with pytest.raises(RecipeError, match="remove `activations`"):
        _run(planted, base.model_copy(update={"activations": load_recipe("w8a8-dynamic").activations}), stats)
    with pytest.raises(RecipeError, match=r"unknown llm_int8 option\(s\) \['alpha'\]"):
        _run(planted, _with(base, alpha=0.5), stats)
    with pytest.raises(RecipeError, match="w8-llmint8-t6: llm_int8 zero_point must be true or false, got 'yes'"):
        _run(planted, _with(base, zero_point="yes"), stats)


# ----------------------------------------------------------------------------- SmoothQuant


def test_smoothing_with_up_down_leaves_the_float_logits_unchanged(planted, stats):
    reference = load_model(planted)
    model = load_model(planted)
    for i, layer in enumerate(model.model.layers):
        absmax = {n: s.absmax for n, s in stats.items()}
        smooth_layer(layer, ARCHITECTURES["llama"].block, absmax, 0.8, prefix=f"model.layers.{i}", up_down=True)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, reference.model.layers[0].mlp.up_proj.weight)
    ids = _ids(seed=5, n=2)
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


STATIC = str(Path(__file__).resolve().parent.parent / "bench" / "recipes" / "w8a8-smoothquant-a05-static.yaml")


@pytest.mark.parametrize("name,naive", [
    ("w8a8-smoothquant-a05", "w8a8-dynamic"),
    ("w8a8-smoothquant-a08", "w8a8-dynamic"),
    ("w8a8-smoothquant-auto", "w8a8-dynamic"),
    ("w8a8-smoothquant-auto-gptq", "w8a8-dynamic"),
    (STATIC, "w8a8-static-minmax"),
])
def test_smoothquant_checkpoint_loads_in_transformers_and_beats_naive_w8a8(planted, stats, tmp_path, name, naive):
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(name)
    if recipe.options["alpha"] == "auto":
        recipe = _with(recipe, grid=[0.3, 0.5, 0.8])
    result = _save(planted, recipe, stats, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    ours = load_quantized(tmp_path / "q")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = _ids(seed=5, n=2)
    with torch.no_grad():
        a, b = ours(ids).logits, served(ids).logits
    # static: the same grid exactly; dynamic: compressed-tensors rounds per token at absmax / 127.5, quantmill at / 127
    assert ((a - b).abs().max() / b.abs().max()).item() < (1e-3 if recipe.activations.dynamic is False else 0.05)
    row = next(r for r in result.report if r["module"] == "model.layers.0.self_attn.q_proj")
    assert row["act_absmax"] < row["act_absmax_before"] / 4  # the planted channels were divided down
    if not recipe.activations.dynamic:  # static scales from the smoothed model's own calibration absmax
        assert result.input_qparams["model.layers.0.self_attn.q_proj"][0].item() == pytest.approx(row["act_absmax"] / 127, rel=1e-6)
    reference = load_model(planted)
    _save(planted, load_recipe(naive), stats, tmp_path / "naive")
    err_smooth, err_naive = _rel_logit_error(ours, reference), _rel_logit_error(load_quantized(tmp_path / "naive"), reference)
    print(f"{recipe.name}: relative logit error {err_smooth:.4f} vs {naive} {err_naive:.4f} ({err_naive / err_smooth:.1f}x); alphas {result.notes['smoothquant_alphas']}")
    assert err_smooth * 1.5 < err_naive


def test_smoothquant_killed_after_block_0_resumes_identically(planted, stats, tmp_path):
    recipe = _with(STATIC, alpha="auto", grid=[0.3, 0.6])  # static: the input scales come from the resumed stats too
    _, whole = _run(planted, recipe, stats)

    class Killed(Exception):
        pass

    def die(i, n, meta):
        if i == 0:
            raise Killed

    with pytest.raises(Killed):
        _run(planted, recipe, stats, tmp_path / "partial", die)
    visited = []
    _, resumed = _run(planted, recipe, stats, tmp_path / "partial", lambda i, n, meta: visited.append(i))
    assert visited == [1]
    assert resumed.notes["smoothquant_alphas"] == whole.notes["smoothquant_alphas"]
    for name, qw in whole.weights.items():
        assert torch.equal(resumed.weights[name].q, qw.q), name
        assert torch.equal(resumed.input_qparams[name][0], whole.input_qparams[name][0]), name


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "half", None])
def test_smoothquant_alpha_outside_0_1_is_a_recipe_error(planted, stats, alpha):
    with pytest.raises(RecipeError, match=r"w8a8-smoothquant-a05: smoothquant alpha must be in \[0, 1\]"):
        _run(planted, _with("w8a8-smoothquant-a05", alpha=alpha), stats)


def test_smoothquant_search_grid_outside_0_1_and_weight_only_recipes_are_refused(planted, stats):
    with pytest.raises(RecipeError, match=r"alpha must be in \[0, 1\]"):
        _run(planted, _with("w8a8-smoothquant-auto", grid=[0.5, 2.0]), stats)
    with pytest.raises(RecipeError, match="search_error must be one of"):
        _run(planted, _with("w8a8-smoothquant-auto", search_error="l1"), stats)
    weight_only = load_recipe("w8a8-smoothquant-a05").model_copy(update={"activations": None})
    with pytest.raises(RecipeError, match="add an `activations` scheme"):
        _run(planted, weight_only, stats)


def test_smoothquant_per_fold_search_gives_each_fold_an_alpha_and_a_block_error_no_worse(planted, stats, tmp_path):
    recipe = _with("w8a8-smoothquant-auto", grid=[0.3, 0.5, 0.8], search="per_fold")
    seen = []
    _, result = _run(planted, recipe, stats, tmp_path / "partial", lambda i, n, meta: seen.append(meta))
    alphas = result.notes["smoothquant_alphas"]
    assert result.notes["smoothquant_search"] == "per_fold"
    assert all(set(a) == {"input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj"} for a in alphas)
    for meta in seen:  # coordinate descent starts at the best shared alpha: never worse than it
        assert meta["search_error"] <= meta["shared_search_error"] == min(meta["alpha_errors"].values())
    rows = {r["module"]: r for r in result.report}
    assert rows["model.layers.1.self_attn.o_proj"]["alpha"] == alphas[1]["self_attn.v_proj"]
    assert rows["model.layers.1.mlp.gate_proj"]["alpha"] == alphas[1]["post_attention_layernorm"]
    print(f"per-fold alphas {alphas}; block errors {[(m['search_error'], m['shared_search_error']) for m in seen]}")


def test_smoothquant_then_gptq_resumes_identically_and_lowers_the_weight_error_of_rtn(planted, stats, tmp_path):
    recipe = _with(STATIC, alpha="auto", grid=[0.3, 0.6], quantizer="gptq")  # static: input scales from resumed stats
    _, whole = _run(planted, recipe, stats)
    _, rtn_result = _run(planted, _with(STATIC, alpha="auto", grid=[0.3, 0.6]), stats)
    assert whole.notes["smoothquant_quantizer"] == "gptq" and whole.notes["smoothquant_alphas"] == rtn_result.notes["smoothquant_alphas"]

    def die(i, n, meta):
        if i == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(planted, recipe, stats, tmp_path / "partial", die)
    _, resumed = _run(planted, recipe, stats, tmp_path / "partial")
    for name, qw in whole.weights.items():
        assert torch.equal(resumed.weights[name].q, qw.q), name
        assert torch.equal(resumed.input_qparams[name][0], whole.input_qparams[name][0]), name
    # the same smoothed weights; GPTQ's integer weights see the inputs: smaller output error (tr dW H dW^T)
    gptq_err = {r["module"]: r["rel_output_error"] for r in whole.report}
    rtn_err = {r["module"]: r["rel_output_error"] for r in rtn_result.report}
    wins = sum(gptq_err[m] < rtn_err[m] for m in gptq_err)
    print(f"GPTQ below RTN on {wins}/{len(gptq_err)} Linears; mean rel output error {sum(gptq_err.values()) / len(gptq_err):.2e} vs {sum(rtn_err.values()) / len(rtn_err):.2e}")
    assert wins >= 0.8 * len(gptq_err)


def test_smoothquant_gptq_options_need_quantizer_gptq_and_an_unknown_quantizer_is_refused(planted, stats):
    with pytest.raises(RecipeError, match=r"w8a8-smoothquant-auto: option\(s\) \['actorder'\] apply to quantizer: gptq only"):
        _run(planted, _with("w8a8-smoothquant-auto", actorder=True), stats)
    with pytest.raises(RecipeError, match=r"smoothquant quantizer must be 'rtn' or 'gptq', got 'awq'"):
        _run(planted, _with("w8a8-smoothquant-auto", quantizer="awq"), stats)


def test_smoothquant_unknown_search_or_per_fold_with_a_fixed_alpha_is_refused(planted, stats):
    with pytest.raises(RecipeError, match=r"w8a8-smoothquant-auto: smoothquant search must be one of \('shared', 'per_fold'\), got 'global'"):
        _run(planted, _with("w8a8-smoothquant-auto", search="global"), stats)
    with pytest.raises(RecipeError, match=r"w8a8-smoothquant-a05: smoothquant search 'per_fold' needs alpha: auto"):
        _run(planted, _with("w8a8-smoothquant-a05", search="per_fold"), stats)


def test_smoothquant_without_stats_is_a_stats_error(planted):
    with pytest.raises(StatsError, match="model.layers.0"):
        _run(planted, load_recipe("w8a8-smoothquant-a05"), {})


def test_a_norm_that_cannot_be_folded_is_an_error_naming_the_module(planted, stats, tmp_path):
    model = load_model(planted)
    model.model.layers[0].input_layernorm = nn.Identity()
    ctx = MethodContext(model, load_recipe("w8a8-smoothquant-a05"), stats, _ids(), torch.device("cpu"))
    with pytest.raises(RecipeError, match=r"model\.layers\.0\.input_layernorm: cannot fold smoothing into Identity"):
        REGISTRY["smoothquant"].run(ctx)


def test_an_architecture_without_folds_in_the_table_is_refused_naming_it(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=257, max_position_embeddings=128, word_embed_proj_dim=32)
    model = OPTForCausalLM(config).eval()
    opt_stats = collect_stats(model, _ids(n=8), torch.device("cpu"), batch_size=8, nbins=256)
    for recipe, pattern in [
        (_with("w8a8-smoothquant-a05", up_down=False), r"smoothquant needs the norm -> Linear folds .* has none for 'opt'$"),
        (load_recipe("w8a8-smoothquant-a05"), r"smoothquant needs the norm -> Linear folds .* has none for 'opt'$"),
    ]:
        with pytest.raises(RecipeError, match=pattern):
            REGISTRY["smoothquant"].run(MethodContext(model, recipe, opt_stats, _ids(n=8), torch.device("cpu")))
