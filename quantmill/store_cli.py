"""`quantmill store ls` and `quantmill store gc`: what the stage store holds, and collecting the
partial results killed runs left behind (kept until then, so a re-run can resume them)."""

from __future__ import annotations

import json
import os
import re
import time

import typer

from quantmill.core.errors import QuantmillError

# The store is imported inside the commands, as the CLI's other layers are (cli.py), so building
# the command table stays cheap.

GC_AGE_ENV = "QUANTMILL_GC_OLDER_THAN"
DEFAULT_GC_AGE = "7d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect the stage store and collect killed runs' partial results.")


def parse_age(text: str, what: str = "--older-than") -> float:
    """'90s', '30m', '12h', '7d', '2w' (or a bare number of seconds) -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise QuantmillError(f"{what}: {text!r} is not an age (a number with s, m, h, d or w, e.g. 7d)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _fail(err: QuantmillError) -> None:
    typer.echo(f"error: {str(err).splitlines()[0]}", err=True)
    raise typer.Exit(2)


def _what(store, stage: str, key: str) -> str:
    """What an entry is, in words: its source, recipe or evaluated model (of a remote entry not
    in the cache, from its manifest alone: nothing else is downloaded)."""
    try:
        entry = store.get_local(stage, key)
        data = store.remote.manifest(stage, key) if entry is None and store.remote is not None else None
        m = entry.manifest if entry is not None else json.loads(data) if data is not None else {}
    except (QuantmillError, ValueError):
        return "corrupt manifest.json"
    if not isinstance(m, dict):
        return "corrupt manifest.json"
    what = m.get("source") or (m.get("recipe") or {}).get("name") or m.get("what") or (m.get("spec") or {}).get("dataset")
    return str(what or "")


def _notes(row: dict) -> str:
    """An entry's notes: what it is, and for a remote store whether this host has it cached."""
    if "cached" not in row:
        return row["what"]
    return ", ".join(x for x in (row["what"], "cached here" if row["cached"] else "") if x)


def _rows(store) -> list[dict]:
    from quantmill.tasks.store import STAGE_VERSIONS, folder_size, last_modified

    now = time.time()
    rows = []
    if store.remote is not None:  # the entries are the bucket's; the partials are this host's
        order = list(STAGE_VERSIONS)
        for e in sorted(store.remote.entries(), key=lambda e: (order.index(e.stage) if e.stage in order else len(order), e.key)):
            rows.append({
                "stage": e.stage, "kind": "entry", "key": e.key, "age_s": now - e.modified, "size_bytes": e.size,
                "path": f"{store.location}/{e.stage}/{e.key}", "what": _what(store, e.stage, e.key), "cached": store.path(e.stage, e.key).is_dir(),
            })
    for stage in store.stages():
        for path in store.entries(stage) if store.remote is None else []:
            rows.append({
                "stage": stage, "kind": "entry", "key": path.name, "age_s": now - last_modified(path), "size_bytes": folder_size(path),
                "path": str(path), "what": _what(store, stage, path.name),
            })
        for p in store.partials(stage):
            rows.append({
                "stage": stage, "kind": "partial", "key": p.key, "age_s": now - last_modified(p.path), "size_bytes": folder_size(p.path),
                "path": str(p.path), "pid": p.pid, "owner": "running" if p.alive else "dead", "blocks_done": p.blocks_done(),
            })
    return rows


@app.command("ls")
def ls(as_json: bool = typer.Option(False, "--json", help="print the rows as JSON")) -> None:
    """Entries and partial results per stage, with ages (since last written) and sizes."""
    from quantmill.tasks.store import Store

    try:
        store = Store()
        rows = _rows(store)
    except QuantmillError as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps({"root": store.location, "rows": rows}, indent=1))
        return
    if not rows:
        typer.echo(f"{store.location}: empty")
        return
    header = ["stage", "kind", "key", "age", "size", "notes"]
    table = [header] + [
        [r["stage"], r["kind"], r["key"][:16], human_age(r["age_s"]), human_size(r["size_bytes"]),
         f"pid {r['pid']} {r['owner']}, {r['blocks_done']} blocks done" if r["kind"] == "partial" else _notes(r)]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(c.rjust(w) if i in (3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    partials = [r for r in rows if r["kind"] == "partial"]
    typer.echo(f"\n{len(rows) - len(partials)} entries, {len(partials)} partials in {store.location}")


@app.command("gc")
def gc(
    older_than: str = typer.Option(None, "--older-than", help=f"collect dead runs' partials not written to for this long (default: ${GC_AGE_ENV} or {DEFAULT_GC_AGE})"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be collected, remove nothing"),
) -> None:
    """Remove partial results of dead runs older than an age; entries and running builds stay."""
    from quantmill.tasks.store import Store, folder_size, last_modified

    try:
        age = parse_age(older_than) if older_than is not None else parse_age(os.environ.get(GC_AGE_ENV, DEFAULT_GC_AGE), GC_AGE_ENV)
        store, now = Store(), time.time()  # of a remote store: this host's cache
    except QuantmillError as err:
        _fail(err)
    if dry_run:
        doomed = [p for s in store.stages() for p in store.partials(s) if not p.alive and now - last_modified(p.path) >= age]
        for p in doomed:
            typer.echo(f"would remove {p.stage}/{p.path.name} ({human_size(folder_size(p.path))}, {human_age(now - last_modified(p.path))} old)")
        typer.echo(f"{len(doomed)} partials older than {human_age(age)} would be removed")
        return
    sizes = {p.path: (folder_size(p.path), now - last_modified(p.path)) for s in store.stages() for p in store.partials(s)}
    removed = store.collect(age, now)
    for p in removed:
        size, old = sizes.get(p.path, (0, 0.0))
        typer.echo(f"removed {p.stage}/{p.path.name} ({human_size(size)}, {human_age(old)} old)")
    typer.echo(f"{len(removed)} partials older than {human_age(age)} removed")
