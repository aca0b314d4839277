"""The module names a scale fold works on, as data the solvers are handed.

Which norm feeds which Linears is architecture knowledge, and it lives in one place: the
architecture table (quantmill/model/arch.py). The solvers import nothing above core, so they
do not read that table; the methods pass its row for the model in (a `BlockNames`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FoldKind = Literal["norm", "linear", "linear_gqa"]


@dataclass(frozen=True)
class Fold:
    """Divide the output of `producer` by s and multiply the input columns of `consumers` by s:
    the block computes the same function (SmoothQuant's and AWQ's scales move this way).

    kind "norm": the producer is a norm (its weight and bias are divided);
    "linear": a Linear's rows, through an op that is linear in each channel (up_proj ->
    down_proj through act(gate) * up); "linear_gqa": v_proj's rows, each shared by the o_proj
    columns of its KV group, read off the head counts of the `attention` module.
    Names are relative to the decoder block.
    """

    producer: str
    consumers: tuple[str, ...]
    kind: FoldKind = "norm"
    attention: str | None = None


@dataclass(frozen=True)
class BlockNames:
    """One decoder block's module names, relative to the block.

    linears: its Linears in forward order. folds: in AWQ's order (each norm, then the Linear
    fold behind it); empty where the table knows none, and the fold methods then refuse.
    no_clip: the Linears AWQ's clip search leaves alone (q and k: their error goes through the
    softmax, as in the paper's code).
    """

    linears: tuple[str, ...]
    folds: tuple[Fold, ...] = ()
    no_clip: tuple[str, ...] = ()

    def folds_of(self, kind: FoldKind) -> tuple[Fold, ...]:
        return tuple(f for f in self.folds if f.kind == kind)

    def fold_names(self, v_o: bool = True, up_down: bool = False) -> list[str]:
        """SmoothQuant's folds by producer: the norms, then v_proj (v -> o) and up_proj
        (up -> down) when those folds are on. The alpha search walks them in this order."""
        kinds = ("norm",) + (("linear_gqa",) if v_o else ()) + (("linear",) if up_down else ())
        return [f.producer for kind in kinds for f in self.folds_of(kind)]

    def producer_of(self) -> dict[str, str]:
        """Consumer Linear -> the producer whose fold scales its input."""
        return {c: f.producer for f in self.folds for c in f.consumers}
