"""Activation statistics of every Linear input in the decoder blocks, collected block by block.

Per input channel: absmax, min, max, mean square, and the count of |x| >= the outlier threshold
(OUTLIER_THRESHOLD, LLM.int8()'s 6.0); per tensor: a signed histogram fine enough for percentile, MSE and KL range
selection, and each batch's min/max (for moving-average observers). Linears that read the same
tensor (q/k/v, gate/up) share one accumulator. Everything later stages need is derived from
these, so changing an observer never re-runs calibration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from quantmill.model.arch import block_linears, quantizable
from quantmill.model.sequential import BlockInputs, run_sequential
from quantmill.solvers.observers import ActivationStats, StatsAccumulator

VECTOR_FIELDS = ("absmax", "min", "max", "mean_sq", "outliers")


def _to_cpu(s: ActivationStats) -> ActivationStats:
    return ActivationStats(**{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(s).items()})


def stats_to_tensors(prefix: str, s: ActivationStats) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.{f}": getattr(s, f) for f in VECTOR_FIELDS}
    tensors[f"{prefix}.hist"] = s.hist
    tensors[f"{prefix}.batch_min"] = s.batch_min
    tensors[f"{prefix}.batch_max"] = s.batch_max
    tensors[f"{prefix}.scalars"] = torch.tensor([s.hist_range, float(s.count)], dtype=torch.float64)
    return tensors


def stats_from_tensors(prefix: str, t: dict[str, torch.Tensor]) -> ActivationStats:
    hist_range, count = t[f"{prefix}.scalars"].tolist()
    return ActivationStats(
        **{f: t[f"{prefix}.{f}"] for f in VECTOR_FIELDS},
        hist=t[f"{prefix}.hist"],
        hist_range=hist_range,
        batch_min=t[f"{prefix}.batch_min"],
        batch_max=t[f"{prefix}.batch_max"],
        count=int(count),
    )


def block_stats_visitor(nbins: int):
    """Hooks every Linear of a block, runs the block once, returns its stats as tensors."""

    def visit(index: int, block: nn.Module, inputs: BlockInputs, forward) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[torch.Tensor]]:
        owners: dict[str, StatsAccumulator] = {}
        aliases: dict[str, str] = {}
        last: dict[str, Any] = {"x": None, "name": None}

        def hook(name: str):
            def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0]
                if x is last["x"]:  # q/k/v (gate/up) read the very same tensor: count it once
                    aliases[name] = aliases.get(last["name"], last["name"])
                    return
                last["x"], last["name"] = x, name
                if name not in owners:
                    owners[name] = StatsAccumulator(nbins)
                owners[name].update(x)

            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in block_linears(block).items()]
        try:
            outputs = forward()
        finally:
            for h in handles:
                h.remove()
        tensors: dict[str, torch.Tensor] = {}
        for name, acc in owners.items():
            tensors.update(stats_to_tensors(name, _to_cpu(acc.finalize())))
        return tensors, {"aliases": aliases, "block": index}, outputs

    return visit


def collect_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 8,
    nbins: int = 4096,
    partial_dir: Path | None = None,
    on_block_done=None,
) -> dict[str, ActivationStats]:
    """Statistics of every decoder-block Linear input, keyed by full module name."""
    layers_path = quantizable(model).layout.layers  # GPT-2 (Conv1D) is refused, not left without stats
    results = run_sequential(
        model,
        input_ids,
        block_stats_visitor(nbins),
        device=device,
        batch_size=batch_size,
        partial_dir=partial_dir,
        desc="stats",
        on_block_done=on_block_done,
    )
    stats: dict[str, ActivationStats] = {}
    for index, (tensors, meta) in enumerate(results):
        stats.update(block_stats(tensors, meta["aliases"], f"{layers_path}.{index}"))
    return stats


def block_stats(tensors: dict[str, torch.Tensor], aliases: dict[str, str], block_prefix: str) -> dict[str, ActivationStats]:
    """One block's statistics, by full module name, from what `block_stats_visitor` returned for it
    (other tensors kept beside them, e.g. a method's weights, are left alone)."""
    stats = {}
    for key in tensors:
        if key.endswith(".scalars"):  # one per accumulator (stats_to_tensors)
            owner = key[: -len(".scalars")]
            stats[f"{block_prefix}.{owner}"] = stats_from_tensors(owner, tensors)
    for name, owner in aliases.items():
        stats[f"{block_prefix}.{name}"] = stats[f"{block_prefix}.{owner}"]
    return stats


def save_stats(stats: dict[str, ActivationStats], folder: Path) -> dict[str, Any]:
    """stats.safetensors (vectors + histograms), channels.parquet and modules.parquet; returns a summary."""
    tensors: dict[str, torch.Tensor] = {}
    channel_rows: dict[str, list] = {"module": [], "channel": [], **{f: [] for f in VECTOR_FIELDS}}
    module_rows: dict[str, list] = {"module": [], "channels": [], "tokens": [], "absmax": [], "outlier_channels": [], "hist_range": []}
    for name, s in stats.items():
        tensors.update(stats_to_tensors(name, s))
        c = s.absmax.numel()
        channel_rows["module"] += [name] * c
        channel_rows["channel"] += list(range(c))
        for f in VECTOR_FIELDS:
            channel_rows[f] += getattr(s, f).tolist()
        module_rows["module"].append(name)
        module_rows["channels"].append(c)
        module_rows["tokens"].append(s.count // c)
        module_rows["absmax"].append(float(s.absmax.max()))
        module_rows["outlier_channels"].append(int((s.outliers > 0).sum()))
        module_rows["hist_range"].append(s.hist_range)
    # Aliased modules share tensors; safetensors refuses shared storage, so store copies.
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, folder / "stats.safetensors")
    pq.write_table(pa.table(channel_rows), folder / "channels.parquet")
    pq.write_table(pa.table(module_rows), folder / "modules.parquet")
    (folder / "modules.json").write_text(json.dumps(sorted(stats)))
    worst = max(stats.items(), key=lambda kv: float(kv[1].absmax.max()))
    return {
        "modules": len(stats),
        "max_absmax": float(worst[1].absmax.max()),
        "max_absmax_module": worst[0],
        "outlier_channels": int(sum(module_rows["outlier_channels"])),
    }


def load_stats(folder: Path) -> dict[str, ActivationStats]:
    tensors = load_file(folder / "stats.safetensors")
    names = json.loads((folder / "modules.json").read_text())
    return {name: stats_from_tensors(name, tensors) for name in names}
