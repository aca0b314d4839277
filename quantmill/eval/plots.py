"""Plots people compare: model size against perplexity, one point per recipe plus the float model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def size_vs_ppl(reference: dict[str, Any], rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Scatter of checkpoint size (MB) against perplexity, labelled by recipe; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([reference["size_mb"]], [reference["ppl"]], marker="*", s=160, color="black", label="float reference")
    for row in rows:
        ax.scatter([row["size_mb"]], [row["ppl"]], s=40)
        ax.annotate(row["recipe"], (row["size_mb"], row["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(reference["ppl"], color="grey", linewidth=0.6, linestyle="--")
    ax.set_xlabel("checkpoint size (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title or "size vs perplexity")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
