"""Where the decoder blocks live in each transformers architecture: one small table, no tracing.

Walking `model.model.layers` one block at a time (the reference GPTQ code's approach) works on
every architecture in the table; an unknown one gets an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from quantmill.core.errors import SourceError


@dataclass(frozen=True)
class Layout:
    """Attribute paths (dotted, from the top-level model) of the parts the sequential engine needs."""

    layers: str
    embeddings: tuple[str, ...]
    final_norm: str
    rotary: str | None = None


_DECODER = Layout("model.layers", ("model.embed_tokens",), "model.norm", "model.rotary_emb")

LAYOUTS: dict[str, Layout] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "phi3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "opt": Layout(
        "model.decoder.layers",
        ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        "model.decoder.final_layer_norm",
    ),
    "gpt2": Layout("transformer.h", ("transformer.wte", "transformer.wpe"), "transformer.ln_f"),
}


def get_attr(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def layout_of(model: nn.Module) -> Layout:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LAYOUTS:
        known = ", ".join(sorted(LAYOUTS))
        raise SourceError(f"architecture {model_type!r} is not supported (known: {known})")
    return LAYOUTS[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_attr(model, layout_of(model).layers)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one decoder block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
