"""What every quantmill checkpoint folder holds besides its weights, what a writer is handed,
and how a folder's tensors are read.

Shared by the compressed-tensors writer (checkpoint.py) and the LLM.int8() one
(llm_int8_checkpoint.py), so neither imports the other for these names.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from quantmill.core.qparams import QuantizedWeight
from quantmill.methods.recipe import Recipe

LINEAGE_FILE = "quantmill.json"
RECIPE_FILE = "recipe.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `folder`, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


@dataclass
class CheckpointInput:
    """What every checkpoint writer (`quantmill.io.checkpoint.WRITERS`) is handed.

    weights: module name -> quantized weight. input_qparams: module name -> static input scale and
    zero point (recipes with static activations). tokenizer_dir: where the tokenizer files are
    copied from. release_weights: the writer may empty `weights` once their numbers are in the
    model (the quantize stage's peak host memory).
    """

    model: nn.Module
    weights: dict[str, QuantizedWeight]
    recipe: Recipe
    lineage: dict[str, Any]
    tokenizer_dir: Path | None = None
    input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    release_weights: bool = False


def write_beside_weights(dst: Path, ckpt: CheckpointInput, lineage: dict[str, Any]) -> None:
    """The files beside the weights: the tokenizer's, the recipe, and `lineage` (the run's lineage
    plus what the writer adds: its format and options) as quantmill.json."""
    if ckpt.tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if (ckpt.tokenizer_dir / fname).is_file():
                shutil.copy2(ckpt.tokenizer_dir / fname, dst / fname)
    (dst / RECIPE_FILE).write_text(ckpt.recipe.to_yaml())
    (dst / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str))
