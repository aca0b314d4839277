"""The architecture table: everything quantmill knows about a transformers architecture's names.

Per `config.model_type`: where the decoder blocks live (the reference GPTQ code walks
`model.model.layers` one block at a time; no tracing), the Linears of a block in forward order,
the norm -> Linear folds AWQ and SmoothQuant move scales through, and, for an architecture that
loads but cannot be quantized, why. An unknown architecture gets an error naming it; no other
module spells a block's module names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.nn as nn

from quantmill.core.errors import RecipeError, SourceError
from quantmill.solvers.folds import BlockNames, Fold


@dataclass(frozen=True)
class Layout:
    """Attribute paths (dotted, from the top-level model) of the parts the sequential engine needs."""

    layers: str
    embeddings: tuple[str, ...]
    final_norm: str
    rotary: str | None = None


@dataclass(frozen=True)
class Architecture:
    """One row of the table. refused: why quantmill cannot quantize it (None: it can)."""

    layout: Layout
    block: BlockNames
    refused: str | None = None


_DECODER = Layout("model.layers", ("model.embed_tokens",), "model.norm", "model.rotary_emb")
_Q, _K, _V, _O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
_GATE, _UP, _DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"


def _llama_block(mlp_norm: str = "post_attention_layernorm") -> BlockNames:
    """Llama's block; `mlp_norm` is the norm feeding the MLP (Gemma-2 puts post_attention_layernorm
    on the attention output and feeds the MLP from pre_feedforward_layernorm)."""
    return BlockNames(
        linears=(_Q, _K, _V, _O, _GATE, _UP, _DOWN),
        folds=(
            Fold("input_layernorm", (_Q, _K, _V)),
            Fold(_V, (_O,), "linear_gqa", attention="self_attn"),
            Fold(mlp_norm, (_GATE, _UP)),
            Fold(_UP, (_DOWN,), "linear"),
        ),
        no_clip=(_Q, _K),
    )


_LLAMA = Architecture(_DECODER, _llama_block())

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": Architecture(_DECODER, _llama_block("pre_feedforward_layernorm")),
    # Fused q/k/v and gate/up Linears: no folds in the table yet (awq and smoothquant refuse).
    "phi3": Architecture(_DECODER, BlockNames(("self_attn.qkv_proj", _O, "mlp.gate_up_proj", _DOWN))),
    # LayerNorms and fc1 -> ReLU -> fc2: no folds in the table yet (awq and smoothquant refuse).
    "opt": Architecture(
        Layout(
            "model.decoder.layers",
            ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
            "model.decoder.final_layer_norm",
        ),
        BlockNames((_Q, _K, _V, "self_attn.out_proj", "fc1", "fc2")),
    ),
    "gpt2": Architecture(
        Layout("transformer.h", ("transformer.wte", "transformer.wpe"), "transformer.ln_f"),
        BlockNames(("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
        refused="its blocks use transformers' Conv1D (weight stored [in, out]), not nn.Linear, and quantmill quantizes nn.Linear only",
    ),
}

# Where the blocks live, per architecture: what the loaders and the sequential engine read.
LAYOUTS: dict[str, Layout] = {name: arch.layout for name, arch in ARCHITECTURES.items()}


def get_attr(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture_of(model: nn.Module) -> Architecture:
    """The model's row of the table, or an error naming its architecture and the known ones."""
    model_type = model_type_of(model)
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise SourceError(f"architecture {model_type!r} is not supported (known: {known})")
    return ARCHITECTURES[model_type]


def check_quantizable_type(model_type: str) -> None:
    """Refuse a model type the table says quantmill cannot quantize (from config.json alone, so
    a request can be refused before any work; unknown types are left to `architecture_of`)."""
    arch = ARCHITECTURES.get(model_type)
    if arch is not None and arch.refused:
        raise SourceError(f"architecture {model_type!r} cannot be quantized: {arch.refused}")


def quantizable(model: nn.Module) -> Architecture:
    """`architecture_of`, refusing an architecture the table says quantmill cannot quantize."""
    arch = architecture_of(model)
    check_quantizable_type(model_type_of(model))
    return arch


def block_folds(model: nn.Module, method: str) -> BlockNames:
    """The block names of a model whose folds `method` (awq, smoothquant) needs; an error naming the
    architecture where the table has none."""
    names = quantizable(model).block
    if not names.folds:
        raise RecipeError(
            f"{method} needs the norm -> Linear folds of the decoder blocks; the architecture table "
            f"(quantmill/model/arch.py) has none for {model_type_of(model)!r}"
        )
    return names


def layout_of(model: nn.Module) -> Layout:
    return architecture_of(model).layout


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get_attr(model, layout_of(model).layers)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The Linear modules of one decoder block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def forward_order(modules: Iterable[str]) -> tuple[str, ...]:
    """The block Linears in forward order of the architecture whose Linears include most of
    `modules` (names inside a block; the first such row on a tie): for views like the outlier
    report, which see module names but not the model."""
    wanted = set(modules)
    best = max(ARCHITECTURES.values(), key=lambda a: len(wanted & set(a.block.linears)))
    return best.block.linears
