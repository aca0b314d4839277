"""`quantmill models | show | pull | promote | register`: the registry face for serving teams.

Each command finds the tracking URI as the flow does ($MLFLOW_TRACKING_URI, else the SQLite store
under $QUANTMILL_HOME), prints a table or `--json`, and reports bad input in one line, exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import typer

from quantmill.console import fail
from quantmill.core.errors import QuantmillError

# catalog, fetch and the registry load mlflow: imported inside the commands that use them, so
# the rest of the CLI starts without it.


@contextlib.contextmanager
def _one_line_errors(debug: bool) -> Iterator[None]:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is ours (--json)
    warnings.filterwarnings("ignore")
    try:
        yield
    except typer.Exit:
        raise
    except QuantmillError as err:
        fail(err, debug)
    except Exception as err:  # unexpected: still one line unless --debug
        fail(RuntimeError(f"{type(err).__name__}: {err}"), debug)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Rows as an aligned text table; columns: (key, header, format spec)."""

    def cell(value: Any, spec: str) -> str:
        if value is None or value == []:
            return "-"
        if isinstance(value, list):
            return ",".join(map(str, value))
        return format(value, spec) if spec else str(value)

    body = [[cell(r.get(k), spec) for k, _, spec in columns] for r in rows]
    header = [h for _, h, _ in columns]
    widths = [max(len(x[i]) for x in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def models(
    pattern: str = typer.Argument("", help="only models whose name contains this (* matches anything)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """List registered quantmill models, one row per version."""
    with _one_line_errors(debug):
        from quantmill.catalog import list_versions

        rows = list_versions(pattern)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo("no registered quantmill models" + (f" matching {pattern!r}" if pattern else ""))
        return
    typer.echo(_table(rows, [
        ("uri", "version", ""), ("aliases", "aliases", ""), ("recipe", "recipe", ""), ("source", "source", ""),
        ("ppl_ratio", "ppl ratio", ".4f"), ("kl", "KL", ".4f"), ("size_mb", "size MB", ".1f"), ("gate", "gate", ""), ("created", "created (UTC)", ""),
    ]))


def show(
    uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Lineage, metrics, quality gate and checkpoint hashes of one registered version."""
    with _one_line_errors(debug):
        from quantmill.catalog import describe

        info = describe(uri)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    lin, gate = info["lineage"], info["gate"]
    lines = [
        f"{info['uri']}  aliases: {', '.join(info['aliases']) or '-'}  created {info['created']} UTC  ({info['tracking_uri']})",
        "",
        "lineage",
        f"  source            {lin['source']} @ {lin['source_revision']}",
        *(f"  source sha256     {name}  {digest}" for name, digest in sorted(lin["source_file_sha256"].items())),
        f"  calibration       {lin['calibration']}  text sha256 {lin['calibration_text_sha256']}",
        f"  recipe            {lin['recipe']}  hash {lin['recipe_hash']}",
        *(f"  stage key         {stage:<20} {key}" for stage, key in sorted(lin["stage_keys"].items())),
        f"  quantmill         {lin['code_version']}   Prefect flow run {lin['prefect_flow_run_id']}   MLflow run {info['run_id']}",
        "",
        "evaluation  " + "  ".join(f"{k}={v}" for k, v in sorted(info["evaluation"].items())),
        "metrics     " + "  ".join(f"{k}={info['metrics'][k]:.4g}" for k in ("ppl", "ppl_ratio", "kl", "top1_agreement", "size_mb", "bits_per_weight") if k in info["metrics"]),
        f"gate        {gate['status']}" + (f": {gate['reasons']}" if gate["reasons"] else "") + (f"  limits {gate['limits']}" if gate["limits"] else ""),
        f"smoke text  {gate['smoke_text']!r}",
        *(f"promoted    to {alias} at {p['at']} ({'from version ' + str(p['from_version']) if p['from_version'] else 'new alias'}{', forced' if p['forced'] else ''})" for alias, p in sorted(info["promotions"].items())),
        "",
        "checkpoint sha256",
        *(f"  {digest}  {name}" for name, digest in sorted(info["checkpoint_sha256"].items())),
    ]
    typer.echo("\n".join(lines))


def pull(
    uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION"),
    folder: str = typer.Argument(..., help="where the checkpoint goes (created; must be empty unless --force)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty FOLDER"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Download a registered version and verify every file against the sha256 recorded at registration."""
    with _one_line_errors(debug):
        from quantmill.fetch import pull as pull_version

        pulled = pull_version(uri, folder, force=force)
    if as_json:
        typer.echo(json.dumps({"uri": pulled.uri, "folder": str(pulled.folder), "files": pulled.files, "bytes": pulled.bytes}))
        return
    typer.echo(f"{pulled.uri} -> {pulled.folder} ({pulled.files} files, {pulled.bytes / 1e6:.1f} MB, every sha256 verified)")
    typer.echo(f"load it: {pulled.load_line()}")


def promote(
    uri: str = typer.Argument(..., help="models:/NAME/VERSION (or @ALIAS) to promote"),
    alias: str = typer.Option(..., "--alias", help="the alias to move, e.g. production"),
    force: bool = typer.Option(False, "--force", help="promote a version that failed its quality gate"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Point ALIAS at a version (refused for a gate-failed version unless --force); recorded as a tag."""
    with _one_line_errors(debug):
        from quantmill.catalog import promote as promote_version

        done = promote_version(uri, alias, force=force)
    if as_json:
        typer.echo(json.dumps(done))
        return
    moved = f"from version {done['from_version']}" if done["from_version"] else "new alias"
    typer.echo(f"{done['uri']} is now @{alias} ({moved}; {done['at']})")


def register(
    match: str = typer.Argument("", help="only pending registrations whose key or name contains this"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Register quantized results whose registration failed earlier (registry down), recomputing nothing."""
    with _one_line_errors(debug):
        from quantmill.tasks.registry import pending_registrations, register_pending

        if not any(match in p.name for p in pending_registrations()):
            typer.echo("nothing pending" + (f" matching {match!r}" if match else ""))
            return
        done = register_pending(match)
    if as_json:
        typer.echo(json.dumps(done))
        return
    for r in done:
        typer.echo(f"{r['uri']}  gate {r['gate']}" + ("  (already registered)" if r["reused"] else ""))


def add_commands(app: typer.Typer) -> None:
    for command in (models, show, pull, promote, register):
        app.command()(command)
