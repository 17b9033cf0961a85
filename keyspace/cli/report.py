"""`keyspace rank-report`: HTML + PNG report of key ranks, pre vs post RoPE, and calibration transfer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keyspace.cli.analyze import THRESHOLD_HELP, UNCENTERED_HELP
from keyspace.cli.common import handle_errors, print_json, stderr, stdout
from keyspace.cli.defaults import latest_run

OUT_HELP = "Folder for index.html and the PNGs (default: reports/<first run>; with --json and no --out, no files)."


@handle_errors
def command(
    runs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="One or more run folders of the same model. Default: the most recent complete"
            " run under ./runs.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help=OUT_HELP)] = None,
    threshold: Annotated[str, typer.Option("--threshold", "-t", help=THRESHOLD_HELP)] = "0.9",
    uncentered: Annotated[bool, typer.Option("--uncentered", help=UNCENTERED_HELP)] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print ranks, summaries and transfer numbers as JSON on stdout."
        ),
    ] = False,
) -> None:
    """Report ranks per layer and KV head, pre vs post RoPE, and transfer; analyzes runs first if needed."""
    from keyspace.analyze.pca import AnalyzeConfig, parse_thresholds
    from keyspace.reports.build import build_report

    config = AnalyzeConfig(parse_thresholds(threshold), centered=not uncentered)
    if not runs:
        run, note = latest_run("RUN")
        stderr.print(note, soft_wrap=True, markup=False)
        runs = [run]
    if out is None and not as_json:
        out = Path("reports") / runs[0].resolve().name
    report = build_report(runs, out, config)
    for warning in report.warnings:
        stderr.print(f"Warning: {warning}", soft_wrap=True)
    for label, fresh in zip(report.labels, report.reanalyzed, strict=True):
        if fresh:
            stderr.print(f"Analyzed {label}: wrote its ranks and calibration files", soft_wrap=True)
    if as_json:
        print_json(report.to_json())
    elif report.index is not None:
        stdout.print(f"Report: {report.index}", soft_wrap=True)
