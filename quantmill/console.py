"""How the command line reports an error: one line on stderr and exit status 2, or the traceback
with --debug. Shared by every CLI module, below all of them, so none imports cli.py for it."""

from __future__ import annotations

import typer


def fail(err: BaseException, debug: bool) -> None:
    if debug:
        raise err
    typer.echo(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", err=True)
    raise typer.Exit(2)
