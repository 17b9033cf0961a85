"""`keyspace verify`: check every file of a run folder against its recorded sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keyspace.cli.common import handle_errors, print_json, stdout


@handle_errors
def command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `keyspace collect`.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the per-file result as JSON on stdout.")
    ] = False,
) -> None:
    """Verify a run: every file against its sha256; exit 2 when any is missing or damaged."""
    from keyspace.runfolder.verify import verify_run

    result = verify_run(run)
    if as_json:
        print_json(result.to_json())
    else:
        print_table(result)
    if result.bad:
        raise result.error()
    if result.state != "complete":
        raise result.partial_error()


def print_table(result) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{result.run} ({result.state})")  # the console prints without markup
    for name in ("file", "expected sha256", "state"):
        table.add_column(name, no_wrap=name != "file", overflow="fold")
    colour = {"ok": "green", "missing": "yellow", "damaged": "red", "stale": "red"}
    for f in result.files:
        state = Text(f.state, style=colour[f.state])
        table.add_row(f.path, f.expected[:16] + ("…" if f.expected else "-"), state)
    stdout.print(table)
    ok = len(result.files) - len(result.bad)
    analyzed = "" if result.analyzed else "; not analyzed yet"
    stdout.print(f"{ok} of {len(result.files)} files verified{analyzed}", soft_wrap=True)
