"""Plain-text tables for the bench scripts' printed output (copied into docs/bench/*.md)."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def fmt(v, spec: str) -> str:
    """A number in `spec`, or "-" when missing."""
    return "-" if v is None else format(v, spec)
