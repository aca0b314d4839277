"""What every quantmill checkpoint folder holds besides its weights, and how its tensors are read.

Shared by the compressed-tensors writer (checkpoint.py) and the LLM.int8() one
(llm_int8_checkpoint.py), so neither imports the other for these names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

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
