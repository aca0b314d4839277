"""The per-module quantization report, shaped for people: per-block tables, MLflow metrics, a plot.

Generic over methods: a report row is a dict with a `module` name and whatever the method measured
(GPTQ: gptq_loss, rel_output_error, damp, fallback_rtn, ...; RTN: rel_weight_error,
rel_output_error). The block index is the row's `block` when present, else the first numeric
component of the module name (`model.layers.7.mlp.down_proj` -> 7, suffix `mlp.down_proj`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

_INDEXED = re.compile(r"^(?:.*?\.)?(\d+)\.(.+)$")
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_.\-/ ]")
# Not measurements: identity and layout columns a method may add.
_NOT_METRICS = {"block", "module"}


def block_of(row: dict[str, Any]) -> int | None:
    if isinstance(row.get("block"), int):
        return row["block"]
    m = _INDEXED.match(str(row.get("module", "")))
    return int(m.group(1)) if m else None


def suffix_of(row: dict[str, Any]) -> str:
    """The module's name inside its block (`self_attn.q_proj`), or the whole name outside blocks."""
    name = str(row.get("module", ""))
    m = _INDEXED.match(name)
    return m.group(2) if m else name


def numeric_fields(row: dict[str, Any]) -> dict[str, float]:
    """The row's measurements as floats (booleans as 0/1); lists, strings and NaN are left out."""
    out = {}
    for k, v in row.items():
        if k in _NOT_METRICS or v is None or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if math.isfinite(v):
            out[k] = v
    return out


def metric_name(*parts: str) -> str:
    return _METRIC_NAME.sub("_", ".".join(parts))


def by_block(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    blocks: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        b = block_of(row)
        if b is not None:
            blocks[b].append(row)
    return dict(sorted(blocks.items()))


def block_summary(rows: list[dict[str, Any]], block_seconds: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """One row per block: module count, mean of every numeric field, worst relative output error."""
    table = []
    for b, members in by_block(rows).items():
        fields: dict[str, list[float]] = defaultdict(list)
        for row in members:
            for k, v in numeric_fields(row).items():
                fields[k].append(v)
        entry: dict[str, Any] = {"block": b, "modules": len(members)}
        for k, values in fields.items():
            entry[f"mean {k}"] = sum(values) / len(values)
        if fields.get("rel_output_error"):
            worst = max(members, key=lambda r: numeric_fields(r).get("rel_output_error", -1.0))
            entry["worst module"] = suffix_of(worst)
            entry["max rel_output_error"] = max(fields["rel_output_error"])
        if block_seconds and b in block_seconds:
            entry["seconds"] = block_seconds[b]
        table.append(entry)
    return table


def markdown_table(rows: list[dict[str, Any]], block_seconds: dict[int, float] | None = None, title: str = "") -> str:
    """The per-block summary as a markdown table (a Prefect artifact)."""
    table = block_summary(rows, block_seconds)
    if not table:
        return f"{title}\n\n(no per-block report)\n" if title else "(no per-block report)\n"
    columns = list(dict.fromkeys(k for row in table for k in row))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = [f"{title}\n" if title else ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in table:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def layer_metrics(rows: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(name, value, step=block) for every module's numeric fields, plus per-block means
    (`layer.<suffix>.<field>` and `block.<field>`)."""
    out: list[tuple[str, float, int]] = []
    for b, members in by_block(rows).items():
        fields: dict[str, list[float]] = defaultdict(list)
        for row in members:
            for k, v in numeric_fields(row).items():
                out.append((metric_name("layer", suffix_of(row), k), v, b))
                fields[k].append(v)
        for k, values in fields.items():
            out.append((metric_name("block", k), sum(values) / len(values), b))
    return out


def plot_output_error(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """A PNG of relative output error per module by block (one line per module suffix); None when
    the report has no rel_output_error."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for b, members in by_block(rows).items():
        for row in members:
            v = numeric_fields(row).get("rel_output_error")
            if v is not None:
                series[suffix_of(row)].append((b, v))
    if not series:
        return None
    # The object API with the Agg canvas: no pyplot global state, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("relative output error")
    if all(y > 0 for pts in series.values() for _, y in pts):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "relative output error per module")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
