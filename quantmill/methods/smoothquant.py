"""Outlier-aware methods as recipe methods: LLM.int8(), AWQ and SmoothQuant (entries of METHODS).

The numerical parts live in quant/llm_int8.py, quant/awq.py and quant/smoothquant.py; this
module turns them into `MethodContext -> MethodResult` functions over the sequential engine.

- `llm_int8`: int8 weights per output row (RTN absmax); at run time LLMInt8Linear sends the input
  columns with any |x| >= threshold through a float matmul and the rest through int8 with
  per-token scales. Saved in quantmill's own format (quant/llm_int8_checkpoint.py).
- `awq`: per decoder block, on the block's calibration inputs (the outputs of the already
  quantized earlier blocks), search and fold AWQ scales (and optionally clip), then quantize the
  block with RTN or GPTQ (`options.quantizer`), exactly as the GPTQ walk does. Only float weights
  and norms change before quantization, so the checkpoint is the usual compressed-tensors one.
- `smoothquant`: per decoder block, fold SmoothQuant scales (alpha fixed, or searched per block
  on the calibration inputs), then record the smoothed block's input statistics; finally the
  recipe's W8A8 scheme is applied as the `rtn` method does (static input scales from the
  recipe's observer over the smoothed statistics). Smoothing is exact, so the block inputs of
  the walk are those of the float model, and the stats stage's absmax is valid for every block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from quant.arch import decoder_layers, layout_of
from quant.errors import RecipeError, StatsError
from quant.methods import MethodContext, MethodResult, layer_granularity, rtn, target_linears, weight_error_report
from quant.qparams import QuantizedWeight, quantize_weight_rtn
from quant.recipe import Recipe
from quant.sequential import BlockInputs, run_sequential

BATCH_SIZE = 8  # calibration samples per batch in the walks (as the GPTQ walk)


def _check_options(recipe: Recipe, known: set[str]) -> None:
    unknown = set(recipe.options) - known
    if unknown:
        raise RecipeError(f"recipe {recipe.name}: unknown {recipe.method} option(s) {sorted(unknown)} (known: {sorted(known)})")


def _search_batches(inputs: BlockInputs, samples: int) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The first calibration batches (about `samples` samples, at least one batch) with the same
    shape as the first, and the first batch's keyword arguments (position embeddings, mask)."""
    first = inputs.hidden[0]
    batches = [first]
    for h in inputs.hidden[1:]:
        if sum(b.shape[0] for b in batches) + h.shape[0] > samples or h.shape != first.shape:
            break
        batches.append(h)
    return batches, inputs.kwargs[0]


def _block_params(block: nn.Module) -> dict[str, torch.Tensor]:
    return {f"float.{n}": p.detach().cpu().clone() for n, p in block.named_parameters()}


def _restore_params(block: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    params = dict(block.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith("float."):
                p = params[key[len("float.") :]]
                p.copy_(value.to(device=p.device, dtype=p.dtype))


# ----------------------------------------------------------------------------- LLM.int8()

LLM_INT8_OPTIONS = {"threshold", "zero_point"}


def llm_int8_threshold(recipe: Recipe) -> float:
    from quant.llm_int8 import DEFAULT_THRESHOLD, validate_threshold

    try:
        return validate_threshold(recipe.options.get("threshold", DEFAULT_THRESHOLD))
    except RecipeError as err:
        raise RecipeError(f"recipe {recipe.name}: {err}") from None


def llm_int8_zero_point(recipe: Recipe) -> bool:
    """options.zero_point: quantize the int8 part's inputs per token with a zero point (the paper's
    zeropoint vector-wise quantization) instead of absmax (bitsandbytes'). false unless set."""
    value = recipe.options.get("zero_point", False)
    if not isinstance(value, bool):
        raise RecipeError(f"recipe {recipe.name}: llm_int8 zero_point must be true or false, got {value!r}")
    return value


def llm_int8(ctx: MethodContext) -> MethodResult:
    """LLM.int8() (Dettmers et al. 2022): int8 weights per output row; the outlier decomposition
    runs at inference. The report adds, per module, the input channels whose calibration max|x|
    reaches the threshold (the columns the float path would take for an input like the whole
    calibration set)."""
    from quant.llm_int8 import inputs_label

    recipe = ctx.recipe
    _check_options(recipe, LLM_INT8_OPTIONS)
    threshold = llm_int8_threshold(recipe)
    zero_point = llm_int8_zero_point(recipe)
    w = recipe.weights
    if (w.type, w.bits, w.symmetric, w.granularity) != ("int", 8, True, "channel"):
        raise RecipeError(f"recipe {recipe.name}: llm_int8 stores symmetric int8 weights per output channel (weights: bits 8, symmetric, granularity channel)")
    if recipe.activations is not None:
        raise RecipeError(f"recipe {recipe.name}: llm_int8 quantizes its inputs itself (int8 per token, outlier columns in float): remove `activations`")
    weights: dict[str, QuantizedWeight] = {}
    report: list[dict[str, Any]] = []
    for name, linear in target_linears(ctx.model, recipe).items():
        qw = quantize_weight_rtn(linear.weight.data, 8, True, "channel")
        weights[name] = qw
        extra: dict[str, Any] = {}
        s = ctx.stats.get(name)
        if s is not None:
            cols = s.absmax >= threshold
            extra = {"calib_outlier_columns": int(cols.sum()), "calib_outlier_fraction": float(cols.float().mean())}
        report.append(weight_error_report(name, linear.weight.data, qw, s, **extra))
    return MethodResult(weights, report, {"llm_int8_threshold": threshold, "llm_int8_inputs": inputs_label(zero_point)})


def llm_int8_outlier_fractions(model: nn.Module) -> dict[str, float]:
    """Per LLMInt8Linear: the mean share of its input columns taken out (sent through the float
    path) over every forward since it was built or reset. Empty for a model without them."""
    from quant.llm_int8 import LLMInt8Linear

    return {name: m.mean_outlier_fraction for name, m in model.named_modules() if isinstance(m, LLMInt8Linear)}


# ----------------------------------------------------------------------------- AWQ

AWQ_OPTIONS = {"grid", "clip", "search_samples", "quantizer"}


def _quantizer_choice(recipe: Recipe) -> str:
    """options.quantizer of awq / smoothquant: how the (scaled) weights are quantized, rtn or
    gptq; GPTQ's own options are accepted with gptq only."""
    from quant.gptq_walk import OPTION_KEYS

    quantizer = recipe.options.get("quantizer", "rtn")
    if quantizer not in ("rtn", "gptq"):
        raise RecipeError(f"recipe {recipe.name}: {recipe.method} quantizer must be 'rtn' or 'gptq', got {quantizer!r}")
    gptq_keys = set(recipe.options) & OPTION_KEYS
    if gptq_keys and quantizer != "gptq":
        raise RecipeError(f"recipe {recipe.name}: option(s) {sorted(gptq_keys)} apply to quantizer: gptq only")
    return quantizer


def _gptq_quantizer(recipe: Recipe, plan: dict[str, tuple[str, int | None]]):
    """The GPTQ solver with the recipe's GPTQ options, as a per-Linear quantizer for quantize_block."""
    from quant.gptq_walk import OPTION_KEYS, gptq_options, gptq_quantizer

    gptq_recipe = recipe.model_copy(update={"options": {k: v for k, v in recipe.options.items() if k in OPTION_KEYS}})
    return gptq_quantizer(gptq_options(gptq_recipe, plan))


def _rtn_quantizer(plan: dict[str, tuple[str, int | None]], recipe: Recipe):
    w = recipe.weights

    def quantize_one(full: str, W: torch.Tensor, H: torch.Tensor) -> tuple[QuantizedWeight, dict[str, Any]]:
        granularity, group_size = plan[full]
        return quantize_weight_rtn(W, w.bits, w.symmetric, granularity, group_size), {}

    return quantize_one


def awq(ctx: MethodContext) -> MethodResult:
    """AWQ (Lin et al. 2023) then RTN or GPTQ, block by block over the sequential engine.

    Options: quantizer (rtn | gptq; gptq also takes the GPTQ options), grid (scale-search and
    clip-search grid, 20), clip (AWQ's weight clipping search, true), search_samples (calibration
    samples the searches run on, 8; whole batches of 8).
    """
    from quant.awq import AWQ_GROUPS, apply_awq_to_layer
    from quant.gptq_walk import OPTION_KEYS, block_linear_names, collect_weights, quantize_block, restore_block_weights
    from quant.smoothquant import mlp_norm_name

    recipe = ctx.recipe
    _check_options(recipe, AWQ_OPTIONS | OPTION_KEYS)
    w = recipe.weights
    if w.type != "int" or w.granularity != "group":
        raise RecipeError(f"recipe {recipe.name}: awq searches scales for integer group-wise weights (weights: type int, granularity group)")
    if recipe.activations is not None:
        raise RecipeError(f"recipe {recipe.name}: awq is weight-only: remove `activations`")
    quantizer = _quantizer_choice(recipe)
    grid = int(recipe.options.get("grid", 20))
    clip = bool(recipe.options.get("clip", True))
    samples = int(recipe.options.get("search_samples", 8))
    if grid < 1 or samples < 1:
        raise RecipeError(f"recipe {recipe.name}: awq grid and search_samples must be >= 1")

    plan = layer_granularity(recipe, target_linears(ctx.model, recipe))
    prefix = layout_of(ctx.model).layers
    quantize_one = _gptq_quantizer(recipe, plan) if quantizer == "gptq" else _rtn_quantizer(plan, recipe)
    true_sequential = bool(recipe.options.get("true_sequential", False))

    def visit(index: int, block: nn.Module, inputs: BlockInputs, forward):
        batches, kwargs = _search_batches(inputs, samples)
        found = apply_awq_to_layer(block, batches, kwargs, w.bits, w.group_size, w.symmetric, grid, clip, prefix=f"{prefix}.{index}")
        names = block_linear_names(block, index, prefix, plan)
        tensors, rows = quantize_block(index, block, inputs, forward, prefix, names, quantize_one, true_sequential)
        producer_of = {}
        for producer, _, consumers in AWQ_GROUPS:
            key = mlp_norm_name(block) if producer == "post_attention_layernorm" else producer
            producer_of.update({c: key for c in consumers})
        for row in rows:
            name = row["module"][len(f"{prefix}.{index}.") :]
            scales = found["scales"].get(producer_of.get(name, ""), {})
            errors = scales.get("errors") or []
            if errors:
                row["awq_ratio"] = scales["ratio"]
                row["awq_search_error_ratio"] = min(errors) / errors[0] if errors[0] > 0 else 1.0  # vs plain RTN, on the search tokens
            if name in found["clip"]:
                row["awq_mean_clip"] = found["clip"][name]
        tensors.update(_block_params(block))  # norms (and Linear rows) the folds changed, for a resume
        return tensors, {"report": rows}, None  # the engine re-runs the quantized block

    def restore(index: int, block: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        _restore_params(block, tensors)
        restore_block_weights(index, block, tensors, meta["report"], prefix, w.bits, plan)

    results = run_sequential(
        ctx.model, ctx.calibration, visit, device=ctx.device, batch_size=BATCH_SIZE, partial_dir=ctx.partial_dir,
        restore=restore, desc=f"awq {recipe.name}", on_block_done=ctx.on_block_done,
    )
    weights, report = collect_weights(results, prefix, w.bits, plan)
    notes: dict[str, Any] = {"awq_quantizer": quantizer}
    fallbacks = [r["module"] for r in report if r.get("fallback_rtn")]
    if fallbacks:
        notes["gptq_rtn_fallbacks"] = fallbacks
    return MethodResult(weights, report, notes)


# ----------------------------------------------------------------------------- SmoothQuant

SMOOTHQUANT_OPTIONS = {"alpha", "grid", "search", "search_samples", "search_error", "v_o", "up_down", "quantizer"}
SEARCHES = ("shared", "per_fold")
UP_DOWN = ("mlp.up_proj", "mlp.down_proj")


def smoothquant_alpha(recipe: Recipe) -> float | str:
    """The recipe's alpha: a number in [0, 1], or "auto" (searched per decoder block)."""
    from quant.smoothquant import validate_alpha

    alpha = recipe.options.get("alpha", 0.5)
    if alpha == "auto":
        return alpha
    try:
        return validate_alpha(alpha)
    except RecipeError as err:
        raise RecipeError(f"recipe {recipe.name}: {err} (or 'auto')") from None


def smooth_layer(
    layer: nn.Module,
    act_absmax: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    prefix: str = "",
    v_o: bool = True,
    up_down: bool = True,
) -> dict[str, torch.Tensor]:
    """`smooth_decoder_layer` (norm -> q/k/v, norm -> gate/up, v -> o) plus, with `up_down`, the
    down_proj input through up_proj's rows: down_proj reads act(gate) * up, linear in each up
    channel, so dividing up row j by s_j divides down_proj input channel j by s_j exactly. That
    input carries the largest activations of Llama-family models. alpha: one number, or one per
    fold (`quant.smoothquant.fold_names`). Returns s per fold."""
    from quant.smoothquant import _lookup, alpha_for, fold_smoothing_linear, get_submodule, smooth_decoder_layer, smoothing_scales

    if up_down:  # resolve before any fold, so a refused layer is left untouched
        up, down = (get_submodule(layer, n, prefix) for n in UP_DOWN)
        if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
            raise RecipeError(f"{prefix}.{UP_DOWN[0]}: cannot fold smoothing (not a Linear)")
        down_absmax = _lookup(act_absmax, UP_DOWN[1], prefix)
        up_alpha = alpha_for(alpha, UP_DOWN[0])
    scales = smooth_decoder_layer(layer, act_absmax, alpha, prefix, v_o=v_o)
    if up_down:
        s = smoothing_scales(down_absmax, down.weight.detach().float().abs().amax(dim=0), up_alpha)
        fold_smoothing_linear(up, [down], s, name=f"{prefix}.{UP_DOWN[0]}" if prefix else UP_DOWN[0])
        scales[UP_DOWN[0]] = s
    return scales


def fold_of(module: str, block: nn.Module) -> str:
    """The fold that smooths a decoder-layer Linear's input ("model.layers.3.self_attn.q_proj" ->
    "input_layernorm"), read off the fold tables of quant.smoothquant and UP_DOWN."""
    from quant.smoothquant import V_O, norm_groups

    consumer_of = {c: norm for norm, consumers in norm_groups(block) for c in consumers}
    consumer_of.update({V_O[1]: V_O[0], UP_DOWN[1]: UP_DOWN[0]})
    return next(fold for c, fold in consumer_of.items() if module == c or module.endswith("." + c))


def block_act_absmax(stats: Mapping[str, Any], block_prefix: str) -> dict[str, torch.Tensor]:
    """max|X_j| of the Linear inputs of one block ("model.layers.3"), keyed relative to the block."""
    return {name[len(block_prefix) + 1 :]: s.absmax for name, s in stats.items() if name.startswith(block_prefix + ".")}


GPTQ_KEY = "gptq."  # prefix of the integer weights in a block's partial result (beside the stats)


def _gptq_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(GPTQ_KEY) :]: v for k, v in tensors.items() if k.startswith(GPTQ_KEY)}


def _fake_w8a8(recipe: Recipe):
    """The recipe's W8A8 in float, for the alpha search: per-channel int8 weights; inputs per token
    (dynamic recipes) or per tensor at the batch's own range (static: a min-max calibration on the
    search batch; the recipe's observer is applied to the final statistics only), symmetric or
    with a zero point as the recipe's inputs."""
    from quant.smoothquant import apply_fake_w8a8

    granularity = "token" if recipe.activations.dynamic else "tensor"
    symmetric = recipe.activations.symmetric
    return lambda module: apply_fake_w8a8(module, granularity, symmetric=symmetric)


def smoothquant(ctx: MethodContext) -> MethodResult:
    """SmoothQuant (Xiao et al. 2023), then the recipe's W8A8 scheme (as the `rtn` method).

    Options: alpha (in [0, 1], or "auto"), grid (the alphas tried by "auto", 0.0 to 1.0 by 0.05),
    search ("shared": one alpha per block, the default; "per_fold": one per fold, by coordinate
    descent from the best shared one, `quant.smoothquant.search_fold_alphas`), search_samples
    (calibration samples of the search, 8; whole batches of 8), search_error (what the search
    minimises: mse, the default, or token_relative; see quant.smoothquant.output_error), v_o
    (smooth o_proj's input through v_proj, true), up_down (smooth down_proj's input through up_proj,
    true), quantizer (how the smoothed weights are quantized: rtn, the default, or gptq, which
    also takes GPTQ's options: SmoothQuant moves activation range into the weights, and GPTQ
    takes back much of the weight error that adds). The static input ranges come from the
    smoothed model's own statistics, recorded during the walk, so every observer sees the
    activations it will quantize.
    """
    from quant.gptq_walk import OPTION_KEYS, block_linear_names, collect_weights, quantize_block, restore_block_weights
    from quant.observers import DEFAULT_NBINS
    from quant.schemes import static_input_qparams
    from quant.smoothquant import ALPHA_GRID, SEARCH_ERRORS, alpha_errors, best_alpha, fold_names, search_fold_alphas, validate_alpha
    from quant.stats import _block_visitor, stats_from_tensors

    recipe = ctx.recipe
    _check_options(recipe, SMOOTHQUANT_OPTIONS | OPTION_KEYS)
    alpha = smoothquant_alpha(recipe)
    if recipe.activations is None:
        raise RecipeError(f"recipe {recipe.name}: smoothquant prepares activations for quantization: add an `activations` scheme (W8A8)")
    grid = [validate_alpha(a) for a in recipe.options.get("grid", ALPHA_GRID)]
    samples = int(recipe.options.get("search_samples", 8))
    search_error = recipe.options.get("search_error", "mse")
    if search_error not in SEARCH_ERRORS:
        raise RecipeError(f"recipe {recipe.name}: smoothquant search_error must be one of {SEARCH_ERRORS}, got {search_error!r}")
    search = recipe.options.get("search", "shared")
    if search not in SEARCHES:
        raise RecipeError(f"recipe {recipe.name}: smoothquant search must be one of {SEARCHES}, got {search!r}")
    if search != "shared" and alpha != "auto":
        raise RecipeError(f"recipe {recipe.name}: smoothquant search {search!r} needs alpha: auto")
    v_o = bool(recipe.options.get("v_o", True))
    up_down = bool(recipe.options.get("up_down", True))
    quantizer = _quantizer_choice(recipe)
    if quantizer == "gptq" and recipe.weights.type != "int":
        raise RecipeError(f"recipe {recipe.name}: smoothquant quantizer gptq needs integer weights (weights: type int)")
    prefix = layout_of(ctx.model).layers
    plan = layer_granularity(recipe, target_linears(ctx.model, recipe))
    quantize_one = _gptq_quantizer(recipe, plan) if quantizer == "gptq" else None
    true_sequential = bool(recipe.options.get("true_sequential", False))
    quantize_fn = _fake_w8a8(recipe)
    stats_visit = _block_visitor(DEFAULT_NBINS)

    def visit(index: int, block: nn.Module, inputs: BlockInputs, forward):
        p = f"{prefix}.{index}"
        absmax = block_act_absmax(ctx.stats, p)
        if not absmax:
            raise StatsError(f"recipe {recipe.name}: smoothquant needs the input absmax of {p}'s Linears; the stats stage has none")
        meta: dict[str, Any] = {}
        a = alpha
        if alpha == "auto":
            batches, kwargs = _search_batches(inputs, samples)
            fold = lambda trial, a_: smooth_layer(trial, absmax, a_, p, v_o, up_down)  # noqa: E731
            if search == "per_fold":
                a, info = search_fold_alphas(block, batches, kwargs, fold_names(block, v_o, up_down), quantize_fn, fold, grid, search_error)
                errors = info["shared"]
                meta.update({"search_error": info["error"], "shared_search_error": info["shared_error"]})
            else:
                with torch.no_grad():
                    errors = alpha_errors(block, batches, kwargs, absmax, quantize_fn, grid, p, search_error, smooth=fold)
                a = best_alpha(errors)
            meta["alpha_errors"] = {str(k): v for k, v in errors.items()}
        scales = smooth_layer(block, absmax, a, p, v_o, up_down)
        tensors, stats_meta, outputs = stats_visit(index, block, inputs, forward)
        tensors.update(_block_params(block))  # the smoothed float weights and norms, for a resume
        meta.update({"alpha": a, "aliases": stats_meta["aliases"], "scale_max": {k: float(v.max()) for k, v in scales.items()}, "scale_min": {k: float(v.min()) for k, v in scales.items()}})
        if quantize_one is not None:  # GPTQ on the smoothed block; the engine re-runs it quantized
            names = block_linear_names(block, index, prefix, plan)
            weights, meta["report"] = quantize_block(index, block, inputs, forward, prefix, names, quantize_one, true_sequential)
            tensors.update({GPTQ_KEY + k: v for k, v in weights.items()})
            outputs = None
        return tensors, meta, outputs

    def restore(index: int, block: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        _restore_params(block, tensors)
        if quantize_one is not None:
            restore_block_weights(index, block, _gptq_tensors(tensors), meta["report"], prefix, recipe.weights.bits, plan)

    results = run_sequential(
        ctx.model, ctx.calibration, visit, device=ctx.device, batch_size=BATCH_SIZE, partial_dir=ctx.partial_dir,
        restore=restore, desc=f"smoothquant {recipe.name}", on_block_done=ctx.on_block_done,
    )
    smoothed_stats = {}
    alphas: dict[int, float | dict[str, float]] = {}
    for index, (tensors, meta) in enumerate(results):
        p = f"{prefix}.{index}."
        stat_tensors = {k: v for k, v in tensors.items() if not k.startswith(("float.", GPTQ_KEY))}
        for owner in {k.rsplit(".", 1)[0] for k in stat_tensors}:
            smoothed_stats[p + owner] = stats_from_tensors(owner, stat_tensors)
        for name, owner in meta["aliases"].items():
            smoothed_stats[p + name] = smoothed_stats[p + owner]
        alphas[index] = meta["alpha"]
    if quantize_one is None:
        result = rtn(MethodContext(ctx.model, recipe, smoothed_stats, ctx.calibration, ctx.device))
    else:
        weights, report = collect_weights([(_gptq_tensors(t), m) for t, m in results], prefix, recipe.weights.bits, plan)
        input_qparams, act_rows = static_input_qparams(recipe, smoothed_stats, list(weights))
        for row in report:
            row.update(act_rows.get(row["module"], {}))
        fallbacks = [r["module"] for r in report if r.get("fallback_rtn")]
        result = MethodResult(weights, report, {"gptq_rtn_fallbacks": fallbacks} if fallbacks else {}, input_qparams=input_qparams)
    layers = decoder_layers(ctx.model)
    for row in result.report:
        index = int(row["module"][len(prefix) + 1 :].split(".", 1)[0])
        row["block"] = index
        a = alphas[index]
        row["alpha"] = a[fold_of(row["module"], layers[index])] if isinstance(a, dict) else a
        row.setdefault("act_absmax", float(smoothed_stats[row["module"]].absmax.max()))
        before = ctx.stats.get(row["module"])
        if before is not None:
            row["act_absmax_before"] = float(before.absmax.max())
    result.notes.update({"smoothquant_quantizer": quantizer, "smoothquant_alpha": alpha, "smoothquant_search": search if alpha == "auto" else None, "smoothquant_alphas": [alphas[i] for i in sorted(alphas)]})
    return result
