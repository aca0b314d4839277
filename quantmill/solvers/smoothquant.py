"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, exactly.

Activations X of LLMs have a few channels j whose max|X_j| is 10-100x the rest; per-tensor or
per-token int8 of X then rounds the ordinary channels to a handful of levels. Weights are flat.
SmoothQuant rewrites Y = X W^T as Y = (X diag(s)^-1) (W diag(s))^T with

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so both factors have tamer channel ranges (alpha = 0.5 balances them). The division of X by s is
folded into whatever produces X (a norm's weight, or the rows of a previous Linear), so the
smoothed float model computes the same function and nothing runs at inference time.

The folds of a decoder layer come from the architecture table (quantmill/model/arch.py), passed
in as `BlockNames`; for the Llama family:
  input_layernorm          -> self_attn.q_proj, k_proj, v_proj
  post_attention_layernorm -> mlp.gate_proj, up_proj   (Gemma-2: pre_feedforward_layernorm)
  self_attn.v_proj (rows)  -> self_attn.o_proj (columns), GQA-aware: see `gqa_column_index`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantmill.core.errors import RecipeError, StatsError
from quantmill.core.grid import IntGrid
from quantmill.core.qparams import compute_qparams, fake_quantize, quantize_weight_rtn
from quantmill.solvers.folds import BlockNames, Fold

EPS = 1e-5
ALPHA_GRID: tuple[float, ...] = tuple(round(i * 0.05, 2) for i in range(21))


# ----------------------------------------------------------------------------- the scales


def validate_alpha(alpha: float) -> float:
    """alpha is the migration strength: 0 keeps X as is, 1 moves all of its range into W."""
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise RecipeError(f"smoothquant alpha must be in [0, 1], got {alpha!r}")
    return float(alpha)


Alpha = float | Mapping[str, float]  # one migration strength, or one per fold (keyed by fold name)


def alpha_for(alpha: Alpha, fold: str) -> float:
    """The alpha of one fold: the shared number, or the fold's entry of a per-fold mapping."""
    if isinstance(alpha, Mapping):
        if fold not in alpha:
            raise RecipeError(f"no smoothquant alpha for fold {fold!r} (have {sorted(alpha)})")
        return validate_alpha(alpha[fold])
    return validate_alpha(alpha)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), clamped to [1e-5, 1e5].

    A channel that never fires (max|X_j| = 0) or has no weight (max|W_j| = 0) gives no reason to
    move range either way: s_j = 1 there, instead of 0 or inf.
    """
    alpha = validate_alpha(alpha)
    if act_absmax.shape != weight_absmax.shape or act_absmax.dim() != 1:
        raise StatsError(
            f"activation absmax {tuple(act_absmax.shape)} does not match weight absmax {tuple(weight_absmax.shape)}"
        )
    X = act_absmax.float().abs().to(weight_absmax.device)
    W = weight_absmax.float().abs()
    s = X.clamp(min=EPS).pow(alpha) / W.clamp(min=EPS).pow(1.0 - alpha)
    s = torch.where((X > 0) & (W > 0), s, torch.ones_like(s))
    return s.clamp(EPS, 1.0 / EPS)


def weight_absmax(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """max|W_j| over every output row of every Linear that reads input channel j."""
    return torch.stack([lin.weight.detach().float().abs().amax(dim=0) for lin in linears]).amax(dim=0)


def gqa_column_index(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """For each o_proj input column, the v_proj output row that feeds it.

    Attention head h reads KV head h // (num_heads / num_kv_heads) (transformers' repeat_kv), and
    its output is linear in V channel by channel: dividing v row (kv, d) by s scales o_proj column
    (h, d) of every head h of that KV group by 1/s. So one scale per v row, repeated across the
    group, is exact with GQA; a free per-column scale on o_proj would not be.
    """
    if num_heads % num_kv_heads:
        raise RecipeError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
    n_rep = num_heads // num_kv_heads
    kv_of_head = torch.arange(num_heads) // n_rep
    return (kv_of_head[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


# ----------------------------------------------------------------------------- exact folds


def _norm_affine_offset(norm: nn.Module, C: int, name: str) -> float:
    """The o in y = n(x) * (w + o) + b of a norm: 0 for Llama/LayerNorm, 1 for Gemma-style norms.

    Read off the module by probing (weight 0 vs 1), not from its class name, so an unfamiliar
    norm either folds exactly or is refused.
    """
    kind = type(norm).__name__
    weight = getattr(norm, "weight", None)
    if "Norm" not in kind or not isinstance(weight, torch.Tensor) or weight.shape != (C,):
        raise RecipeError(f"{name}: cannot fold smoothing into {kind}")
    saved = weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, C, generator=g).to(device=weight.device, dtype=weight.dtype)
    b = getattr(norm, "bias", None)
    b = b.detach().float() if isinstance(b, torch.Tensor) else 0.0
    try:
        with torch.no_grad():
            weight.zero_()
            y0 = norm(x).float()
            weight.fill_(1.0)
            y1 = norm(x).float()
    except Exception as e:  # a module that is called differently is not a norm we know
        raise RecipeError(f"{name}: cannot fold smoothing into {kind} ({type(e).__name__})") from None
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    n = y1 - y0
    ok = n.abs() > 0.1
    if not ok.any():
        raise RecipeError(f"{name}: cannot fold smoothing into {kind}")
    o = ((y0 - b) / n)[ok].median().item()
    if abs(o - round(o)) > 0.05:
        raise RecipeError(f"{name}: cannot fold smoothing into {kind} (output is not affine in its weight)")
    return float(round(o))


def _check_linears(linears: Sequence[nn.Module], C: int, name: str) -> None:
    for i, lin in enumerate(linears):
        if not isinstance(lin, nn.Linear) or lin.in_features != C:
            raise RecipeError(f"{name}: consumer {i} ({type(lin).__name__}) is not a Linear with {C} inputs")


@torch.no_grad()
def _scale_columns(linears: Sequence[nn.Linear], s_cols: torch.Tensor) -> None:
    for lin in linears:
        W = lin.weight
        W.copy_((W.float() * s_cols.to(W.device)[None, :]).to(W.dtype))


@torch.no_grad()
def fold_smoothing(norm: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor, name: str = "norm") -> None:
    """norm.weight (and bias) /= s, every following Linear's columns *= s: the float function is unchanged.

    Works for any norm whose output is y = n(x) * (w + o) + b (LayerNorm, RMSNorm, Gemma's 1 + w),
    checked on a probe; anything else raises RecipeError naming `name`.
    """
    C = s.numel()
    o = _norm_affine_offset(norm, C, name)
    _check_linears(linears, C, name)
    s32 = s.detach().float().to(norm.weight.device)
    w = norm.weight
    w.copy_(((w.float() + o) / s32 - o).to(w.dtype))
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s32).to(bias.dtype))
    _scale_columns(linears, s32)


@torch.no_grad()
def fold_smoothing_linear(
    prev: nn.Linear,
    linears: Sequence[nn.Linear],
    s: torch.Tensor,
    col_index: torch.Tensor | None = None,
    name: str = "linear",
) -> None:
    """prev's output rows (weight and bias) /= s, the consumers' columns *= s[col_index].

    Exact when the consumers' inputs depend linearly, channel by channel, on prev's outputs
    (v_proj -> o_proj through attention, up_proj -> down_proj through the gate product).
    col_index maps each consumer column to the prev row feeding it (None: the identity).
    """
    if not isinstance(prev, nn.Linear) or prev.out_features != s.numel():
        raise RecipeError(f"{name}: cannot fold smoothing into {type(prev).__name__} with {s.numel()} outputs")
    s32 = s.detach().float().to(prev.weight.device)
    s_cols = s32 if col_index is None else s32[col_index.to(s32.device)]
    _check_linears(linears, s_cols.numel(), name)
    prev.weight.copy_((prev.weight.float() / s32[:, None]).to(prev.weight.dtype))
    if prev.bias is not None:
        prev.bias.copy_((prev.bias.float() / s32).to(prev.bias.dtype))
    _scale_columns(linears, s_cols)


# ----------------------------------------------------------------------------- decoder layers


def get_submodule(layer: nn.Module, path: str, prefix: str = "") -> nn.Module:
    """layer.<path>, or a RecipeError naming the missing module and the layer class."""
    try:
        return layer.get_submodule(path)
    except AttributeError:
        where = f"{prefix}.{path}" if prefix else path
        raise RecipeError(f"{where}: no such module in {type(layer).__name__} (not the layout the architecture table names)") from None


def fold_names(names: BlockNames, v_o: bool = True, up_down: bool = False) -> list[str]:
    """The folds of a decoder layer, by the module whose output is divided: the norms, then
    v_proj (v -> o) and up_proj (up -> down) when those folds are on (`BlockNames.fold_names`)."""
    return names.fold_names(v_o, up_down)


def gqa_fold(names: BlockNames, where: str = "") -> Fold:
    """The v -> o fold of the block, or an error saying the table has none."""
    folds = names.folds_of("linear_gqa")
    if not folds:
        raise RecipeError(f"{where or 'decoder layer'}: no v -> o fold in the architecture table for this block")
    return folds[0]


def gqa_attention(fold: Fold, where: str = "") -> str:
    """The attention module whose head counts a `linear_gqa` fold reads."""
    if fold.attention is None:
        raise RecipeError(f"{where or 'decoder layer'}: the v -> o fold from {fold.producer} names no attention module")
    return fold.attention


def attention_heads(layer: nn.Module, attention: str, prefix: str = "") -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of the layer's attention module (path `attention`)."""
    attn = get_submodule(layer, attention, prefix)
    cfg = getattr(attn, "config", None)
    try:
        H, H_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads, attn.head_dim
    except AttributeError:
        where = f"{prefix}.{attention}" if prefix else attention
        raise RecipeError(f"{where}: cannot read head counts from {type(attn).__name__}") from None
    return int(H), int(H_kv), int(d)


def _lookup(stats: Mapping[str, torch.Tensor], key: str, prefix: str) -> torch.Tensor:
    """Stats keyed relative to the layer ("self_attn.q_proj") or by full name ("model.layers.0.self_attn.q_proj")."""
    if key in stats:
        return stats[key]
    full = f"{prefix}.{key}" if prefix else key
    if full in stats:
        return stats[full]
    raise StatsError(f"{full}: no input absmax in the statistics")


def smooth_v_o(layer: nn.Module, fold: Fold, o_act_absmax: torch.Tensor, alpha: float, prefix: str = "") -> torch.Tensor:
    """Smooth o_proj's input through v_proj's rows (the `linear_gqa` fold); one scale per v row,
    shared by its GQA group.

    The activation range of a v row is the largest over the heads that read it; the weight range
    of a v row is the largest over those heads' o_proj columns. Returns the per-v-row s.
    """
    v = get_submodule(layer, fold.producer, prefix)
    o = get_submodule(layer, fold.consumers[0], prefix)
    H, H_kv, d = attention_heads(layer, gqa_attention(fold, prefix), prefix)
    n_rep = H // H_kv
    X = o_act_absmax.float().reshape(H_kv, n_rep, d).amax(dim=1).reshape(-1)
    W = o.weight.detach().float().abs().reshape(o.out_features, H_kv, n_rep, d).amax(dim=(0, 2)).reshape(-1)
    s = smoothing_scales(X, W, alpha)
    fold_smoothing_linear(v, [o], s, gqa_column_index(H, H_kv, d), name=f"{prefix}.{fold.producer}" if prefix else fold.producer)
    return s


def smooth_decoder_layer(
    layer: nn.Module,
    names: BlockNames,
    act_absmax: Mapping[str, torch.Tensor],
    alpha: Alpha,
    prefix: str = "",
    v_o: bool = True,
) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into a decoder layer, in place, through the norm folds and (with
    `v_o`) the v -> o fold of `names` (the architecture table's row); returns s per norm/v_proj.

    act_absmax holds max|X_j| of each Linear's input, measured on the float model (keys relative to
    the layer or full names under `prefix`). Each fold leaves every other Linear's input unchanged,
    so the order of the folds does not matter and the float statistics stay valid. alpha is one
    number, or one per fold keyed by the norm's name and "self_attn.v_proj" (see `fold_names`).
    """
    if not names.folds_of("norm"):
        raise RecipeError(f"{prefix or 'decoder layer'}: no norm -> Linear folds in the architecture table for this block")
    v_fold = gqa_fold(names, prefix) if v_o else None
    for fold in fold_names(names, v_o=v_o):
        alpha_for(alpha, fold)
    # Resolve and check everything before the first fold, so a refused layer is left untouched.
    plan = []
    for norm_name, lin_names in ((f.producer, f.consumers) for f in names.folds_of("norm")):
        where = f"{prefix}.{norm_name}" if prefix else norm_name
        norm = get_submodule(layer, norm_name, prefix)
        linears = [get_submodule(layer, n, prefix) for n in lin_names]
        if not all(isinstance(lin, nn.Linear) for lin in linears):
            raise RecipeError(f"{where}: feeds a module that is not a Linear")
        _norm_affine_offset(norm, linears[0].in_features, where)
        plan.append((norm_name, where, norm, linears, _lookup(act_absmax, lin_names[0], prefix)))
    if v_fold is not None:
        for n in (v_fold.producer, *v_fold.consumers):
            if not isinstance(get_submodule(layer, n, prefix), nn.Linear):
                raise RecipeError(f"{prefix}.{n}: is not a Linear" if prefix else f"{n}: is not a Linear")
        attention_heads(layer, gqa_attention(v_fold, prefix), prefix)
        o_absmax = _lookup(act_absmax, v_fold.consumers[0], prefix)

    out: dict[str, torch.Tensor] = {}
    for norm_name, where, norm, linears, X in plan:
        s = smoothing_scales(X, weight_absmax(linears), alpha_for(alpha, norm_name))
        fold_smoothing(norm, linears, s, name=where)
        out[norm_name] = s
    if v_fold is not None:
        out[v_fold.producer] = smooth_v_o(layer, v_fold, o_absmax, alpha_for(alpha, v_fold.producer), prefix)
    return out


# ----------------------------------------------------------------------------- fake W8A8 and the alpha search


class FakeW8A8Linear(nn.Module):
    """A Linear computing in float what int8 W8A8 computes: per-channel int8 W, int8 X.

    act_scale, if given, is a static (calibrated) symmetric scale for X and wins. Otherwise
    act_granularity "tensor": the current input's range (= static calibration on this very
    batch); "token": each token's range, at run time. symmetric: absmax / 127; otherwise
    [min, max] onto the 256 levels with a zero point.
    """

    def __init__(
        self, linear: nn.Linear, act_granularity: str = "tensor", act_scale: torch.Tensor | float | None = None,
        symmetric: bool = True,
    ):
        super().__init__()
        if act_granularity not in ("tensor", "token"):
            raise RecipeError(f"activation granularity must be 'tensor' or 'token', got {act_granularity!r}")
        Wq = quantize_weight_rtn(linear.weight.detach(), IntGrid.for_weights(8, True), "channel").dequantize()
        self.register_buffer("weight", Wq.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.act_granularity = act_granularity
        self.act_scale = None if act_scale is None else torch.as_tensor(act_scale, dtype=torch.float32)
        self.symmetric = symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        X = x.float()
        zero_point = None
        if self.act_scale is not None:
            scale = self.act_scale.to(X.device)
        else:
            dims = dict(dim=-1, keepdim=True) if self.act_granularity == "token" else {}
            if self.symmetric:
                absmax = X.abs().amax(**dims)
                scale, zero_point = compute_qparams(-absmax, absmax, 8, True)
            else:  # the range [min, max] (with 0) onto the 256 levels, as QuantLinear's asymmetric inputs
                scale, zero_point = compute_qparams(X.amin(**dims), X.amax(**dims), 8, False)
        if zero_point is None:
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
        Xq = fake_quantize(X, scale, zero_point, 8)
        return F.linear(Xq.to(x.dtype), self.weight, self.bias)


def apply_fake_w8a8(
    module: nn.Module, act_granularity: str = "tensor", act_scales: Mapping[str, torch.Tensor] | None = None,
    symmetric: bool = True,
) -> nn.Module:
    """Replace every nn.Linear under `module` by a FakeW8A8Linear, in place; returns `module`."""
    targets = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name, lin in targets:
        fq = FakeW8A8Linear(lin, act_granularity, None if act_scales is None else act_scales.get(name), symmetric)
        if name == "":
            return fq
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, fq)
    return module


def block_output(layer: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], layer_kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The layer's hidden-state output (float32) on one batch [N, T, C] or a list of batches, concatenated."""
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    outs = []
    for x in batches:
        y = layer(x, **layer_kwargs)
        outs.append((y[0] if isinstance(y, tuple) else y).float())
    return torch.cat(outs)


SEARCH_ERRORS = ("mse", "token_relative")


def output_error(reference: torch.Tensor, output: torch.Tensor, kind: str = "mse") -> float:
    """How far a quantized block's output is from the float block's, for the alpha search.

    "mse": the mean squared error (the default). "token_relative": the mean over tokens of
    ||y_t - y_ref_t||^2 / ||y_ref_t||^2, every token counting the same, where in MSE a few
    tokens with massive hidden states weigh most. Measured on demo (w8a8-smoothquant-auto,
    docs/bench/outliers.md): both pick alpha 0.7 for most blocks and give ppl 1.0104 (mse) and
    1.0111 (token_relative) x FP, while a fixed alpha 0.5 gives 1.0013: the block-local search
    itself, not its error measure, is what falls short there.
    """
    diff = (output - reference).pow(2)
    if kind == "mse":
        return diff.mean().item()
    if kind != "token_relative":
        raise ValueError(f"unknown search error {kind!r}; known: {SEARCH_ERRORS}")
    return (diff.sum(-1) / reference.pow(2).sum(-1).clamp_min(1e-12)).mean().item()


@torch.no_grad()
def alpha_errors(
    layer: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    layer_kwargs: Mapping[str, Any],
    act_absmax: Mapping[str, torch.Tensor],
    quantize_fn: Callable[[nn.Module], nn.Module | None],
    grid: Sequence[float] = ALPHA_GRID,
    prefix: str = "",
    error: str = "mse",
    smooth: Callable[[nn.Module, float], Any] | None = None,
    names: BlockNames | None = None,
) -> dict[float, float]:
    """`output_error` of the smoothed, quantized block against the float block, for each alpha
    (`best_alpha` of the result is the search's choice).

    quantize_fn gets a deep copy (smoothed) and may modify it in place or return a new module.
    `smooth(copy_of_layer, alpha)` folds the scales (default: `smooth_decoder_layer` with
    `names`, the block's row of the architecture table, `act_absmax` and `prefix`; one of
    `smooth` and `names` is needed)."""
    for a in grid:
        validate_alpha(a)
    if smooth is None:
        if names is None:
            raise ValueError("alpha_errors needs `smooth` or the block's `names` (the architecture table's row)")
        smooth = lambda trial, a: smooth_decoder_layer(trial, names, act_absmax, a, prefix)  # noqa: E731
    Y = block_output(layer, inputs, layer_kwargs)
    return {float(a): trial_error(layer, Y, inputs, layer_kwargs, lambda t, a=a: smooth(t, a), quantize_fn, error) for a in grid}


def trial_error(
    layer: nn.Module,
    reference: torch.Tensor,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    layer_kwargs: Mapping[str, Any],
    smooth: Callable[[nn.Module], Any],
    quantize_fn: Callable[[nn.Module], nn.Module | None],
    error: str = "mse",
) -> float:
    """`output_error` of one candidate: a deep copy of the layer, smoothed, then quantized (in
    place, or quantize_fn returns the new module), against the float block's output `reference`."""
    trial = copy.deepcopy(layer)
    smooth(trial)
    q = quantize_fn(trial)
    return output_error(reference, block_output(trial if q is None else q, inputs, layer_kwargs), error)


@torch.no_grad()
def search_fold_alphas(
    layer: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    layer_kwargs: Mapping[str, Any],
    folds: Sequence[str],
    quantize_fn: Callable[[nn.Module], nn.Module | None],
    smooth: Callable[[nn.Module, Mapping[str, float]], Any],
    grid: Sequence[float] = ALPHA_GRID,
    error: str = "mse",
) -> tuple[dict[str, float], dict[str, Any]]:
    """One alpha per fold, by coordinate descent on the block-output error.

    The folds move different ranges (a norm into q/k/v, v_proj into o_proj, up_proj into down_proj)
    and the best migration strength for the block's error differs between them. (Measured on demo:
    0-15% lower block error than the best shared alpha, but no lower error of the whole model;
    docs/bench/outliers.md.) Start from the best shared alpha of `grid` (what `alpha_errors` finds), then, fold by
    fold, try every alpha of the grid with the others held and keep a strictly better one.
    len(grid) + len(folds) * (len(grid) - 1) trials. Returns (alpha per fold, {"shared": error per
    shared alpha, "error": the final error, "shared_error": the best shared alpha's error}).

    `smooth(copy_of_layer, alphas)` folds the scales; quantize_fn as in `alpha_errors`.
    """
    for a in grid:
        validate_alpha(a)
    Y = block_output(layer, inputs, layer_kwargs)
    tried: dict[tuple[float, ...], float] = {}

    def err(alphas: Mapping[str, float]) -> float:
        key = tuple(float(alphas[f]) for f in folds)
        if key not in tried:
            tried[key] = trial_error(layer, Y, inputs, layer_kwargs, lambda t: smooth(t, alphas), quantize_fn, error)
        return tried[key]

    shared = {float(a): err({f: float(a) for f in folds}) for a in grid}
    a0 = best_alpha(shared)
    best, best_err = {f: a0 for f in folds}, shared[a0]
    for fold in folds:
        for a in grid:
            candidate = {**best, fold: float(a)}
            e = err(candidate)
            if e < best_err:
                best, best_err = candidate, e
    return best, {"shared": shared, "shared_error": shared[a0], "error": best_err}


def best_alpha(errors: Mapping[float, float]) -> float:
    """The alpha with the smallest error; ties go to the smaller alpha (less range moved into
    the weights)."""
    return min(errors, key=lambda a: (errors[a], a))
