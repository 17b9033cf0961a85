"""The typer app. Each command lives in its own module and imports heavy libraries lazily."""

from __future__ import annotations

import typer

from keyspace.cli import analyze, bench, collect, report, validate, verify

app = typer.Typer(
    name="keyspace",
    help="Measure how low-dimensional attention keys are, and what Loki sparse attention buys.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
app.command("collect")(collect.command)
app.command("analyze")(analyze.command)
app.command("rank-report")(report.command)
app.command("validate")(validate.command)
app.command("bench")(bench.command)
app.command("verify")(verify.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
