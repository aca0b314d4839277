"""Plots people compare: model size against perplexity, one point per recipe plus the float model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both size and perplexity (smaller is better for both), by
    size: the recipes worth choosing among. Rows missing either value are left out."""
    points = sorted((r for r in rows if r.get("size_mb") is not None and r.get("ppl") is not None), key=lambda r: (r["size_mb"], r["ppl"]))
    front: list[dict[str, Any]] = []
    for row in points:  # by size: a row is on the front when it beats every smaller one's perplexity
        if not front or row["ppl"] < front[-1]["ppl"]:
            front.append(row)
    return front


def size_vs_ppl(
    reference: dict[str, Any] | list[dict[str, Any]],
    rows: list[dict[str, Any]],
    path: str | Path,
    title: str = "",
    front: bool = False,
) -> Path:
    """Scatter of checkpoint size (MB) against perplexity, labelled by recipe; written as PNG.
    `reference` is the float model, or several (each with a `label`: a sweep over models); with
    `front`, the Pareto front of `rows` is drawn as a line and its points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = reference if isinstance(reference, list) else [reference]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for ref in references:
        label = f"float: {ref['label']}" if ref.get("label") else "float reference"
        ax.scatter([ref["size_mb"]], [ref["ppl"]], marker="*", s=160, color="black", label=label if len(references) == 1 else None)
        if len(references) > 1:
            ax.annotate(label, (ref["size_mb"], ref["ppl"]), textcoords="offset points", xytext=(5, -10), fontsize=8)
        ax.axhline(ref["ppl"], color="grey", linewidth=0.6, linestyle="--")
    for row in rows:
        ax.scatter([row["size_mb"]], [row["ppl"]], s=40)
        ax.annotate(row["recipe"], (row["size_mb"], row["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if front:
        best = pareto_front(rows)
        ax.plot([r["size_mb"] for r in best], [r["ppl"] for r in best], color="tab:red", linewidth=1, zorder=0, label="Pareto front")
        ax.scatter([r["size_mb"] for r in best], [r["ppl"] for r in best], s=120, facecolors="none", edgecolors="tab:red")
    ax.set_xlabel("checkpoint size (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title or "size vs perplexity")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
