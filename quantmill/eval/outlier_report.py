"""The outlier report: where the large activations are, read from the stored statistics.

Per Linear input (the stats stage's `ActivationStats`): the largest |x|, the channel holding it,
how far it stands above a typical channel, and the channels with at least one |x| >= the outlier
threshold (6.0, LLM.int8()'s), by index. Linears that read the same tensor (q/k/v, gate/up) share
one statistics object; the report keeps a row for each and names the first one in `shares_input_of`.

Two plots (matplotlib, Agg backend, PNG):
- `outliers_heatmap.png`: per-channel max|x| by layer (one row per layer, log colour scale), one
  panel per distinct input kind (the input of q_proj, o_proj, gate_proj, down_proj for Llama);
- `outlier_channels.png`: the number of outlier channels per layer and input kind, and the
  channels that are outliers in the most layers.
Nothing is re-run: the report is a view of the stats, and `write_outlier_report` is cheap.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from quantmill.model.arch import forward_order
from quantmill.solvers.observers import ActivationStats, OUTLIER_THRESHOLD

TABLE_FILE = "outliers.parquet"
HEATMAP_FILE = "outliers_heatmap.png"
CHANNELS_FILE = "outlier_channels.png"
REPORT_FILES = (HEATMAP_FILE, CHANNELS_FILE, TABLE_FILE)

_INDEXED = re.compile(r"^(?:(.*?)\.)?(\d+)\.(.+)$")
_MAX_LISTED = 64  # channels listed per module in the table (the count is always complete)


def split_name(module: str) -> tuple[int | None, str]:
    """`model.layers.7.mlp.down_proj` -> (7, "mlp.down_proj"); a name outside blocks -> (None, name)."""
    m = _INDEXED.match(module)
    return (int(m.group(2)), m.group(3)) if m else (None, module)


def _forward_sort(names: list[str]) -> list[str]:
    """By layer, then in the block's forward order (the architecture table's; modules it does not
    list sort after, by name)."""
    order = forward_order(split_name(n)[1] for n in names)

    def key(name: str) -> tuple[int, int, str]:
        layer, module = split_name(name)
        return (-1 if layer is None else layer, order.index(module) if module in order else len(order), module)

    return sorted(names, key=key)


def _same(a: ActivationStats, b: ActivationStats) -> bool:
    return a is b or (a.count == b.count and a.absmax.shape == b.absmax.shape and torch.equal(a.absmax, b.absmax) and torch.equal(a.mean_sq, b.mean_sq))


def outlier_rows(stats: dict[str, ActivationStats], threshold: float = OUTLIER_THRESHOLD) -> list[dict[str, Any]]:
    """One row per module, in forward order: layer, module (inside its block), largest |x| and its
    channel, the median channel max|x| and the ratio of the two, outlier channels (count and
    indices, most frequent first) and outlier values. Modules of one layer with identical stats
    read the same tensor (the stats store saves a copy for each): `shares_input_of` names the first.
    `threshold` must be the one the stats counted with (the store counts |x| >= OUTLIER_THRESHOLD)."""
    rows = []
    owners: dict[int | None, list[tuple[str, ActivationStats]]] = {}
    for name in _forward_sort(list(stats)):
        s = stats[name]
        layer, module = split_name(name)
        same_layer = owners.setdefault(layer, [])
        owner = next((n for n, o in same_layer if _same(o, s)), None) or name
        if owner == name:
            same_layer.append((name, s))
        absmax = s.absmax.float()
        top = int(absmax.argmax())
        median = float(absmax.median())
        counts = s.outliers.long()
        channels = (counts > 0).nonzero().flatten()
        by_count = channels[counts[channels].argsort(descending=True, stable=True)]
        rows.append({
            "layer": layer,
            "module": module,
            "name": name,
            "shares_input_of": None if owner == name else owner,
            "channels": absmax.numel(),
            "absmax": float(absmax[top]),
            "absmax_channel": top,
            "median_channel_absmax": median,
            "absmax_over_median": float(absmax[top]) / median if median > 0 else float("inf"),
            "threshold": threshold,
            "outlier_channels": int(channels.numel()),
            "outlier_channel_fraction": channels.numel() / max(absmax.numel(), 1),
            "outlier_values": int(counts.sum()),
            "outlier_channel_ids": [int(c) for c in by_count[:_MAX_LISTED]],
        })
    return rows


def _distinct_kinds(rows: list[dict[str, Any]]) -> list[str]:
    """The modules (inside a block) that own their input, in first-seen order: q_proj, o_proj, ..."""
    kinds: list[str] = []
    for r in rows:
        if r["layer"] is not None and r["shares_input_of"] is None and r["module"] not in kinds:
            kinds.append(r["module"])
    return kinds


def _absmax_matrix(stats: dict[str, ActivationStats], rows: list[dict[str, Any]], kind: str) -> tuple[list[int], torch.Tensor]:
    by_layer = {r["layer"]: stats[r["name"]].absmax.float() for r in rows if r["module"] == kind and r["layer"] is not None}
    layers = sorted(by_layer)
    return layers, torch.stack([by_layer[i] for i in layers]) if layers else torch.zeros(0, 0)


def plot_heatmap(stats: dict[str, ActivationStats], rows: list[dict[str, Any]], path: Path, kinds: list[str] | None = None, title: str = "") -> Path:
    """Per-channel max|x| by layer, one panel per input kind (log colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    kinds = kinds or _distinct_kinds(rows)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(11, 2.3 * len(kinds) + 0.8), dpi=110, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        layers, M = _absmax_matrix(stats, rows, kind)
        if not layers:
            ax.set_visible(False)
            continue
        M = M.clamp_min(1e-3).numpy()
        im = ax.imshow(M, aspect="auto", interpolation="nearest", cmap="magma", norm=LogNorm(vmin=max(M.min(), 1e-3), vmax=M.max()))
        ax.set_ylabel("layer")
        ax.set_yticks(range(0, len(layers), max(1, len(layers) // 6)))
        ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), max(1, len(layers) // 6))])
        ax.set_title(f"input of {kind}: per-channel max|x| (largest {M.max():.1f})", fontsize=9)
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    axes[-1, 0].set_xlabel("input channel")
    fig.suptitle(title or "activation max|x| per channel and layer", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_outlier_channels(stats: dict[str, ActivationStats], rows: list[dict[str, Any]], path: Path, kinds: list[str] | None = None, top: int = 24, title: str = "") -> Path:
    """Bars: outlier channels per layer and input kind (symlog scale); the channels that are
    outliers in the most layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = kinds or _distinct_kinds(rows)
    threshold = rows[0]["threshold"] if rows else OUTLIER_THRESHOLD
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), dpi=110)
    width = 0.8 / max(len(kinds), 1)
    for k, kind in enumerate(kinds):
        counts = {r["layer"]: r["outlier_channels"] for r in rows if r["module"] == kind}
        ax1.bar([i + (k - (len(kinds) - 1) / 2) * width for i in layers], [counts.get(i, 0) for i in layers], width=width, label=f"input of {kind}")
    ax1.set_xlabel("layer")
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_ylabel(f"channels with |x| >= {threshold:g}")
    ax1.set_xticks(layers)
    ax1.tick_params(axis="x", labelsize=7)
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    ax1.set_title("outlier channels per layer", fontsize=9)

    recurring: dict[tuple[str, int], int] = {}
    for r in rows:
        if r["module"] in kinds and r["layer"] is not None:
            for c in (stats[r["name"]].outliers > 0).nonzero().flatten().tolist():
                recurring[(r["module"], c)] = recurring.get((r["module"], c), 0) + 1
    best = sorted(recurring.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    ax2.bar(range(len(best)), [n for _, n in best], color=[f"C{kinds.index(kind)}" for (kind, _), _ in best])
    ax2.set_xticks(range(len(best)))
    ax2.set_xticklabels([f"{kind.rsplit('.', 1)[-1]}:{c}" for (kind, c), _ in best], rotation=60, ha="right", fontsize=7)
    ax2.set_ylabel("layers where it is an outlier")
    ax2.set_title(f"the {len(best)} channels that are outliers in the most layers (input kind : channel)", fontsize=9)
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "activation outlier channels", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(rows[0]) if rows else ["name"]
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    owners = [r for r in rows if r["shares_input_of"] is None]
    worst = max(owners, key=lambda r: r["absmax"]) if owners else None
    return {
        "inputs": len(owners),
        "inputs_with_outliers": sum(r["outlier_channels"] > 0 for r in owners),
        "outlier_channels": sum(r["outlier_channels"] for r in owners),
        "max_absmax": worst["absmax"] if worst else None,
        "max_absmax_module": worst["name"] if worst else None,
        "max_absmax_channel": worst["absmax_channel"] if worst else None,
    }


def write_outlier_report(stats: dict[str, ActivationStats], folder: str | Path, title: str = "") -> dict[str, Any]:
    """outliers.parquet, outliers_heatmap.png and outlier_channels.png in `folder`; returns a summary.

    Each file is written under a temporary name and renamed into place, the table last, so a
    folder holding outliers.parquet holds the whole report.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = outlier_rows(stats)
    if not rows:
        raise ValueError("no statistics to report on")
    kinds = _distinct_kinds(rows)
    plot_heatmap(stats, rows, folder / HEATMAP_FILE, kinds, title=f"{title}: per-channel max|x| by layer" if title else "")
    plot_outlier_channels(stats, rows, folder / CHANNELS_FILE, kinds, title=f"{title}: outlier channels (|x| >= {rows[0]['threshold']:g})" if title else "")
    write_table(rows, folder / TABLE_FILE)
    return {**summarize(rows), "files": list(REPORT_FILES), "kinds": kinds}


def has_outlier_report(folder: str | Path) -> bool:
    return all((Path(folder) / f).is_file() for f in REPORT_FILES)
