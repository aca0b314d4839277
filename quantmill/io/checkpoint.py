"""Quantized checkpoints: written in the compressed-tensors layout, read back by quantmill itself.

`save_quantized` hands the integer weights to compressed-tensors' own compressor, so the folder
is what `AutoModelForCausalLM.from_pretrained` (with the compressed-tensors package) and vLLM
expect. `load_quantized` rebuilds the model from the same files with quantmill's own
de-quantization, which is what quantmill evaluates; the two are compared in the tests.

W8A8 / FP8 (a recipe with `activations`): `int-quantized` (int8 weights) or `float-quantized`
(e4m3 weights), per-channel `weight_scale`, and `input_activations` args in the config; dynamic
inputs are `strategy: token, dynamic: true` with no scale saved, static ones `strategy: tensor,
dynamic: false` with `input_scale` (+ `input_zero_point` when asymmetric) from the observer range.
`load_quantized` turns those Linears into `QuantLinear`s, so evaluation quantizes the inputs too.

Asymmetric weights are saved `int-quantized` (one int8 per weight) rather than `pack-quantized`:
transformers 5.24 cannot load packed zero points (the packed [out/8, groups] tensor mismatches the
[out, groups] parameter it allocates; llm-compressor issue 1618). The choice is recorded in
quantmill.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from quantmill.core.errors import RecipeError
from quantmill.core.qparams import QuantizedWeight
from quantmill.io.layout import CheckpointInput, read_tensors, write_beside_weights
from quantmill.io.llm_int8_checkpoint import FORMAT as LLM_INT8_FORMAT
from quantmill.io.llm_int8_checkpoint import is_llm_int8, load_llm_int8, save_llm_int8
from quantmill.methods.base import COMPRESSED_TENSORS, is_ignored
from quantmill.methods.recipe import Recipe
from quantmill.methods.registry import REGISTRY
from quantmill.model.sequential import release_host_memory
from quantmill.nn.quant_linear import QuantLinear, QuantScheme


def checkpoint_format(recipe: Recipe) -> str:
    if recipe.weights.type == "float":
        return "float-quantized"
    if recipe.activations is not None:
        return "int-quantized"
    return "pack-quantized" if recipe.weights.symmetric else "int-quantized"


def _weight_args(recipe: Recipe, granularity: str, group_size: int | None, actorder: bool):
    from compressed_tensors.quantization import QuantizationArgs

    w = recipe.weights
    kwargs: dict[str, Any] = dict(num_bits=w.bits, type=w.type, symmetric=w.symmetric, strategy=granularity)
    if granularity == "group":
        kwargs["group_size"] = group_size
        if actorder:
            kwargs["actorder"] = "group"
    return QuantizationArgs(**kwargs)


def _activation_args(recipe: Recipe):
    from compressed_tensors.quantization import QuantizationArgs

    a = recipe.activations
    if a is None:
        return None
    return QuantizationArgs(
        num_bits=a.bits, type=a.type, symmetric=a.symmetric, dynamic=a.dynamic, strategy=a.granularity
    )


def build_quantization_config(recipe: Recipe, weights: dict[str, QuantizedWeight]):
    """One config group per distinct weight layout (e.g. most layers grouped, a few per-channel)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    layouts: dict[tuple[str, int | None, bool], list[str]] = {}
    for name, qw in weights.items():
        granularity = "group" if qw.group_size else recipe.weights.granularity
        if granularity == "group" and not qw.group_size:
            granularity = "channel"
        layouts.setdefault((granularity, qw.group_size, qw.g_idx is not None), []).append(name)
    groups = {}
    for i, ((granularity, group_size, actorder), names) in enumerate(sorted(layouts.items(), key=lambda kv: -len(kv[1]))):
        groups[f"group_{i}"] = QuantizationScheme(
            targets=sorted(names) if len(layouts) > 1 else ["Linear"],
            weights=_weight_args(recipe, granularity, group_size, actorder),
            input_activations=_activation_args(recipe),
        )
    ignore = sorted(
        {name for name in recipe.ignore} if len(layouts) == 1 else set()
    )
    return QuantizationConfig(config_groups=groups, ignore=ignore or None, format=checkpoint_format(recipe))


def save_quantized(
    model: nn.Module,
    weights: dict[str, QuantizedWeight],
    recipe: Recipe,
    dst: Path,
    lineage: dict[str, Any],
    tokenizer_dir: Path | None = None,
    input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    release_weights: bool = False,
) -> None:
    """Write `model` with `weights` in the checkpoint format the recipe's method names in the
    registry (WRITERS: one writer per format); the arguments are `CheckpointInput`'s."""
    fmt = REGISTRY[recipe.method].checkpoint_format
    if fmt not in WRITERS:
        raise RecipeError(f"recipe {recipe.name}: method {recipe.method} writes {fmt!r}, which no checkpoint writer handles")
    ckpt = CheckpointInput(model, weights, recipe, lineage, tokenizer_dir, input_qparams or {}, release_weights)
    WRITERS[fmt](ckpt, dst)


def save_compressed_tensors(ckpt: CheckpointInput, dst: Path) -> None:
    """Write the model with its weights (integer or fp8) in the compressed-tensors layout; static
    activation recipes also need `input_qparams`, saved as `input_scale` (+ `input_zero_point`
    when asymmetric).

    The model is modified in place (its Linear weights become the de-quantized values). With
    `release_weights` the `weights` dict is emptied once its numbers are in the model, so the
    integer copies (int8 + scales: ~110 MB on demo) are not resident while the checkpoint is
    compressed and written (the quantize stage's peak host memory).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config

    _quiet_compressed_tensors()
    model, weights, recipe, input_qparams = ckpt.model, ckpt.weights, ckpt.recipe, ckpt.input_qparams
    _check_method_output(recipe, weights, input_qparams)
    fmt = checkpoint_format(recipe)
    modules = dict(model.named_modules())
    for name, qw in weights.items():
        modules[name].weight.data.copy_(qw.dequantize().to(modules[name].weight.dtype))
    config = build_quantization_config(recipe, weights)
    apply_quantization_config(model, config)
    for name, qw in weights.items():
        module = modules[name]
        module.weight_scale.data.copy_(qw.scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(qw.zero_point.reshape(module.weight_zero_point.shape))
        if qw.g_idx is not None:
            module.weight_g_idx.data.copy_(qw.g_idx)
        if name in input_qparams:
            scale, zero_point = input_qparams[name]
            module.input_scale.data.copy_(scale.reshape(module.input_scale.shape))
            if hasattr(module, "input_zero_point"):
                module.input_zero_point.data.copy_(zero_point.reshape(module.input_zero_point.shape))
        module.quantization_status = QuantizationStatus.FROZEN
    stray = [n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None and n not in weights]
    if stray:
        raise ValueError(f"modules matched by the config but not quantized: {stray[:5]}")
    if ckpt.release_weights:
        weights.clear()
        release_host_memory()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    write_beside_weights(dst, ckpt, {**ckpt.lineage, "format": fmt})


def _check_method_output(recipe: Recipe, weights: dict[str, QuantizedWeight], input_qparams: dict[str, Any]) -> None:
    """A method that ignores part of the recipe (fp8 weights, static input scales) is refused."""
    method = recipe.method
    if recipe.weights.type == "float" and any(not qw.q.dtype.is_floating_point for qw in weights.values()):
        raise RecipeError(f"recipe {recipe.name}: method {method!r} produced integer weights, not the fp8 weights the recipe asks for")
    a = recipe.activations
    if a is not None and not a.dynamic:
        missing = sorted(set(weights) - set(input_qparams))
        if missing:
            raise RecipeError(f"recipe {recipe.name}: method {method!r} gave no static input scale for {len(missing)} module(s) ({', '.join(missing[:3])})")


def _quiet_compressed_tensors() -> None:
    """compressed-tensors logs (through loguru) a warning per module when the format is chosen
    explicitly, as quantmill does for asymmetric weights; the choice is deliberate (see above)."""
    try:
        from loguru import logger

        logger.disable("compressed_tensors")
    except ImportError:
        pass


def _group_size_of(scheme: dict[str, Any]) -> int | None:
    weights = scheme.get("weights") or {}
    return weights.get("group_size") if weights.get("strategy") == "group" else None


def dequantize_module(prefix: str, tensors: dict[str, torch.Tensor], num_bits: int, packed: bool) -> torch.Tensor:
    """A float weight from the stored integer or e4m3 weight, scale, zero point and g_idx of one Linear."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    scale = tensors[f"{prefix}.weight_scale"].float()
    if packed:
        shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
        q = unpack_from_int32(tensors[f"{prefix}.weight_packed"], num_bits, shape)
    else:
        q = tensors[f"{prefix}.weight"]
    zp = tensors.get(f"{prefix}.weight_zero_point")
    if zp is not None and zp.shape != scale.shape:  # packed along the output dimension
        zp = unpack_from_int32(zp, num_bits, scale.shape, packed_dim=0)
    zp = torch.zeros_like(scale, dtype=torch.int32) if zp is None else zp.to(torch.int32)
    g_idx = tensors.get(f"{prefix}.weight_g_idx")
    out, inp = q.shape
    if g_idx is not None:
        groups = g_idx.long()
    elif scale.shape[1] > 1:
        groups = torch.arange(inp) // (inp // scale.shape[1])
    else:
        groups = torch.zeros(inp, dtype=torch.long)
    # Integers or e4m3 values (zero points 0): one dequantization for both grids.
    return QuantizedWeight(q, scale, zp, num_bits, g_idx=groups.to(torch.int32)).dequantize()


def _group_of(name: str, groups: dict[str, Any]) -> dict[str, Any]:
    """The config group whose targets name this module (exact, suffix, `re:`), else the `Linear` one."""
    for group in groups.values():
        if is_ignored(name, tuple(group["targets"])):  # the same name matching as `ignore`
            return group
    for group in groups.values():
        if "Linear" in group["targets"]:
            return group
    raise ValueError(f"no quantization config group targets {name}")


def scheme_of(group: dict[str, Any]) -> QuantScheme:
    """The QuantScheme of a compressed-tensors config group (weights + input_activations)."""
    w, a = group["weights"], group.get("input_activations")
    act = "none"
    if a is not None:
        act = "dynamic" if a.get("dynamic") else "static"
        want = "token" if act == "dynamic" else "tensor"
        if a.get("strategy") != want:
            raise ValueError(f"{act} input activations with strategy {a.get('strategy')!r} are not supported (only {want!r})")
    return QuantScheme(
        weight_type="fp8" if w.get("type") == "float" else "int",
        weight_bits=w["num_bits"],
        weight_symmetric=w.get("symmetric", True),
        granularity=w.get("strategy", "channel"),
        group_size=w.get("group_size") if w.get("strategy") == "group" else None,
        act=act,
        act_type="int" if a is None or a.get("type") == "int" else "fp8",
        act_bits=8 if a is None else a["num_bits"],
        act_symmetric=True if a is None else a.get("symmetric", True),
    )


def _quant_linear(prefix: str, linear: nn.Linear, scheme: QuantScheme, tensors: dict[str, torch.Tensor], path: str) -> QuantLinear:
    """A QuantLinear holding one module's stored weight, scales and input qparams as they are."""
    if f"{prefix}.weight_g_idx" in tensors:
        raise ValueError(f"{prefix}: act-order (g_idx) weights with quantized activations are not supported")
    module = QuantLinear(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None)
    shape = module.weight_scale.shape
    module.weight_q.copy_(tensors[f"{prefix}.weight"].to(module.weight_q.dtype))
    module.weight_scale.copy_(tensors[f"{prefix}.weight_scale"].float().expand(shape))
    if f"{prefix}.weight_zero_point" in tensors:
        module.weight_zero_point.copy_(tensors[f"{prefix}.weight_zero_point"].to(torch.int32).expand(shape))
    if linear.bias is not None:
        module.bias.copy_(linear.bias.detach().float())
    if scheme.act == "static":
        module.input_scale.copy_(tensors[f"{prefix}.input_scale"].float().reshape(()))
        if f"{prefix}.input_zero_point" in tensors:
            module.input_zero_point.copy_(tensors[f"{prefix}.input_zero_point"].to(torch.int32).reshape(()))
    if path not in ("fake", "int"):
        raise ValueError(f"path must be 'fake' or 'int', got {path!r}")
    if path == "int" and not module.int_path_supported():
        raise ValueError(f"{prefix}: no integer kernel for {module.describe()} on the CPU; use path='fake'")
    module.path = path
    return module


def load_quantized(folder: str | Path, dtype: torch.dtype = torch.float32, path: str = "fake") -> nn.Module:
    """The model a quantmill checkpoint describes, as quantmill evaluates it.

    Weight-only checkpoints: a float model whose quantized Linears hold exactly the de-quantized
    stored weights. Checkpoints with `input_activations` (W8A8, FP8): those Linears become
    `QuantLinear`s holding the stored int8 / fp8 weights, scales and static input scales, so
    inputs are quantized at run time; `path` "fake" (reference, any device) or "int" (int8
    `torch._int_mm` / fp8 `torch._scaled_mm` where the device has it).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if is_llm_int8(folder):  # LLM.int8(): LLMInt8Linear modules (quantmill's own format)
        return load_llm_int8(folder, dtype)
    config = AutoConfig.from_pretrained(folder)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        raise ValueError(f"{folder}: no quantization_config in config.json")
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    del config.quantization_config
    fmt = qconfig.get("format")
    tensors = read_tensors(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    bits = {g["weights"]["num_bits"] for g in qconfig["config_groups"].values()}
    num_bits = bits.pop() if len(bits) == 1 else 8
    state: dict[str, torch.Tensor] = {}
    quantized_prefixes = {k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")}
    for prefix in quantized_prefixes:
        state[f"{prefix}.weight"] = dequantize_module(prefix, tensors, num_bits, fmt == "pack-quantized").to(dtype)
    suffixes = (".weight_scale", ".weight_zero_point", ".weight_packed", ".weight_shape", ".weight_g_idx", ".input_scale", ".input_zero_point")
    for key, value in tensors.items():
        if key.endswith(suffixes) or key in state:
            continue
        if any(key == f"{p}.weight" for p in quantized_prefixes):
            continue
        state[key] = value.to(dtype) if value.is_floating_point() else value
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {missing[:3]}")
    if any(buf.is_meta for buf in model.buffers()):  # non-persistent buffers such as rotary inv_freq: rebuild them on the CPU
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
        fresh.load_state_dict(model.state_dict(), strict=False)
        if getattr(config, "tie_word_embeddings", False):
            fresh.tie_weights()
        model = fresh
    groups = qconfig["config_groups"]
    if any(g.get("input_activations") for g in groups.values()):
        modules = dict(model.named_modules())
        for prefix in sorted(quantized_prefixes):
            parent, _, child = prefix.rpartition(".")
            quantized = _quant_linear(prefix, modules[prefix], scheme_of(_group_of(prefix, groups)), tensors, path)
            setattr(modules[parent], child, quantized)
    return model.eval()


def size_report(folder: str | Path) -> dict[str, Any]:
    """Checkpoint bytes on disk, and stored bits per weight of the quantized Linears
    (integer weights + scales + zero points + g_idx, over their number of weights)."""
    folder = Path(folder)
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    quant_bits = 0
    weights = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            prefixes = {k[: -len(".weight_scale")] for k in keys if k.endswith(".weight_scale")}
            for prefix in prefixes:
                for suffix in (".weight_packed", ".weight", ".weight_scale", ".weight_zero_point", ".weight_g_idx"):
                    if prefix + suffix in keys:
                        t = f.get_slice(prefix + suffix)
                        n = 1
                        for d in t.get_shape():
                            n *= d
                        quant_bits += n * _DTYPE_BITS[t.get_dtype()]
                if prefix + ".weight_shape" in keys:
                    shape = f.get_tensor(prefix + ".weight_shape").tolist()
                else:
                    shape = f.get_slice(prefix + ".weight").get_shape()
                weights += int(shape[0]) * int(shape[1])
    return {
        "size_bytes": total,
        "size_mb": total / 1e6,
        "quantized_weights": weights,
        "bits_per_weight": quant_bits / weights if weights else None,
    }


_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "BOOL": 8}


# checkpoint format (a registry entry's `checkpoint_format`) -> the function that writes it.
WRITERS: dict[str, Callable[[CheckpointInput, Path], None]] = {
    COMPRESSED_TENSORS: save_compressed_tensors,
    LLM_INT8_FORMAT: save_llm_int8,
}
