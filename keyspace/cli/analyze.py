"""`keyspace analyze`: PCA of a run's keys per (kind, layer, KV head); writes its ranks and calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keyspace.cli.common import handle_errors, print_json, stderr, stdout

THRESHOLD_HELP = (
    "Explained-variance thresholds τ in (0, 1], comma-separated; 0.9 is always included."
)
UNCENTERED_HELP = "PCA of the raw second moment (the energy Loki's raw dot products see) instead of the covariance."


@handle_errors
def command(
    run: Annotated[Path, typer.Argument(help="Run folder written by `keyspace collect`.")],
    threshold: Annotated[str, typer.Option("--threshold", "-t", help=THRESHOLD_HELP)] = "0.9",
    uncentered: Annotated[bool, typer.Option("--uncentered", help=UNCENTERED_HELP)] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
) -> None:
    """Analyze a run: rank at τ per layer and KV head, pre and post RoPE; writes the ranks and calibration files."""
    from keyspace.analyze.pca import (
        AnalyzeConfig,
        analyze_and_write,
        parse_thresholds,
        summary_json,
    )

    config = AnalyzeConfig(parse_thresholds(threshold), centered=not uncentered)
    analysis = analyze_and_write(run, config)
    for warning in analysis.warnings:
        stderr.print(f"Warning: {warning}", soft_wrap=True)
    if as_json:
        print_json(summary_json(analysis))
        return
    print_summary(analysis)


def print_summary(analysis) -> None:
    """A rich table of rank statistics per kind and threshold, then where the files went."""
    from rich.table import Table

    mode = "centered" if analysis.config.centered else "uncentered"
    model = analysis.model_spec or analysis.model_identity
    header = f"{model} · {analysis.corpus} · {analysis.tokens} tokens · {mode} PCA"
    stdout.print(header, soft_wrap=True)
    table = Table()
    for name in (
        "kind",
        "spectrum",
        "τ",
        "mean rank",
        "median",
        "min",
        "max",
        f"mean % of {analysis.head_dim}",
    ):
        table.add_column(name, justify="right")
    for kind, ka in analysis.kinds.items():
        spectra = [("key", ka.summary)]
        spectra += [
            (name, sr.summary) for name, sr in (("query", ka.query), ("score", ka.score)) if sr
        ]
        for spectrum, summary in spectra:
            for tau, s in summary.items():
                table.add_row(
                    kind,
                    spectrum,
                    f"{tau:g}",
                    f"{s.mean:.2f}",
                    f"{s.median:g}",
                    str(s.min),
                    str(s.max),
                    f"{100 * s.mean / s.head_dim:.1f}%",
                )
    stdout.print(table)
    stdout.print(f"Model identity: {analysis.model_identity}", soft_wrap=True)
    from keyspace.runfolder.store import calibration_path, ranks_path

    written = f"Wrote {ranks_path(analysis.run)} and {calibration_path(analysis.run)}"
    stdout.print(written, soft_wrap=True)
