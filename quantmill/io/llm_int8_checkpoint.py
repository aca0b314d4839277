"""The LLM.int8() checkpoint: quantmill's own format `quantmill-llm-int8`.

compressed-tensors (and so transformers' and vLLM's loaders) has no format for LLM.int8()'s
outlier decomposition, so quantmill writes one and says so:

- `llm_int8.safetensors`: the model's state dict as `LLMInt8Linear` holds it: for each quantized
  Linear `<name>.weight` (int8 [out, in]), `<name>.weight_scale` (float32 [out, 1], absmax / 127),
  `<name>.threshold` (float32 scalar), `<name>.input_zero_point` (bool scalar: the int8 part's
  inputs per token with a zero point rather than absmax; absent in older checkpoints, which are
  absmax) and `<name>.bias` if any; every other tensor as saved by
  the float model (the tied lm_head is left out, as transformers does).
- `config.json`: the model's config with `quantization_config = {"quant_method":
  "quantmill-llm-int8", "threshold": ..., "modules": [...], ...}`.
- `quantmill.json`: lineage, with `"format": "quantmill-llm-int8"` and the threshold.

The weights file is deliberately not `model.safetensors`: transformers skips an unknown
`quant_method` with a warning and would load the int8 integers as float weights; without
`model.safetensors` it refuses the folder instead. `quantmill.io.checkpoint.load_quantized` loads it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from quantmill.core.errors import RecipeError
from quantmill.io.layout import CheckpointInput, read_tensors, write_beside_weights
from quantmill.methods.llm_int8 import CHECKPOINT_FORMAT, llm_int8_threshold, llm_int8_zero_point
from quantmill.nn.llm_int8 import LLMInt8Linear, inputs_label, validate_threshold

FORMAT = CHECKPOINT_FORMAT
WEIGHTS_FILE = "llm_int8.safetensors"


def _tied_lm_head(model: nn.Module) -> bool:
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight.data_ptr() == emb.weight.data_ptr()


def save_llm_int8(ckpt: CheckpointInput, dst: Path) -> None:
    """Write the model with its weights (module name -> int8 per-row weight) as a
    quantmill-llm-int8 checkpoint. LLM.int8() quantizes its inputs itself at run time, so
    `input_qparams` never apply; the model is not modified, so there is nothing to release early."""
    model, weights, recipe = ckpt.model, ckpt.weights, ckpt.recipe
    threshold = llm_int8_threshold(recipe)
    zero_point = llm_int8_zero_point(recipe)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if _tied_lm_head(model):
        state.pop("lm_head.weight", None)
    for name, qw in weights.items():
        if qw.bits != 8 or qw.group_size is not None or qw.g_idx is not None or bool(qw.zero_point.any()):
            raise RecipeError(f"{name}: llm_int8 checkpoints hold symmetric int8 weights per output row")
        state[f"{name}.weight"] = qw.q.to(torch.int8).cpu()
        state[f"{name}.weight_scale"] = qw.scale.float().reshape(-1, 1).cpu()
        state[f"{name}.threshold"] = torch.tensor(threshold, dtype=torch.float32)
        state[f"{name}.input_zero_point"] = torch.tensor(zero_point)
    dst.mkdir(parents=True, exist_ok=True)
    # Shared storage (tied or aliased tensors) is refused by safetensors: every tensor its own copy.
    save_file({k: v.clone().contiguous() for k, v in state.items()}, dst / WEIGHTS_FILE, metadata={"format": "pt", "quantmill_format": FORMAT})
    config = copy.deepcopy(model.config)
    config.quantization_config = {
        "quant_method": FORMAT,
        "threshold": threshold,
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": not zero_point, "strategy": "token", "dynamic": True, "outliers": f"columns with any |x| >= {threshold:g} in float"},
        "modules": sorted(weights),
        "ignore": list(recipe.ignore),
    }
    config.save_pretrained(dst)
    write_beside_weights(dst, ckpt, {**ckpt.lineage, "format": FORMAT, "llm_int8_threshold": threshold, "llm_int8_inputs": inputs_label(zero_point)})


def is_llm_int8(folder: str | Path) -> bool:
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    qconfig = json.loads(config.read_text()).get("quantization_config") or {}
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == FORMAT


def load_llm_int8(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a quantmill-llm-int8 checkpoint, its quantized Linears as LLMInt8Linear."""
    from transformers import AutoConfig, AutoModelForCausalLM


    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    qconfig = config.quantization_config
    del config.quantization_config
    tensors = read_tensors(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in qconfig["modules"]:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or f"{name}.weight_scale" not in tensors:
            raise ValueError(f"{folder}: {name} is not a quantized Linear of this checkpoint")
        threshold = validate_threshold(float(tensors[f"{name}.threshold"]))
        zero_point = tensors.setdefault(f"{name}.input_zero_point", torch.tensor(False))  # older: absmax
        module = LLMInt8Linear(linear.in_features, linear.out_features, linear.bias is not None, threshold, zero_point=bool(zero_point))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if _tied_lm_head(model) or getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{folder}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
