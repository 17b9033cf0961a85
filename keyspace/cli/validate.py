"""`keyspace validate`: Loki's accuracy at chosen d and k, against baselines at the same budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from keyspace.cli.common import handle_errors, print_json, stderr, stdout
from keyspace.cli.defaults import latest_run
from keyspace.cli.options import config_options
from keyspace.options import option
from keyspace.validate.config import ValidateConfig


@dataclass
class ValidateArgs(ValidateConfig):
    """ValidateConfig as the command line gives it: --run may be left out."""

    run: Path | None = option(
        "--run",
        "Run folder with calibration (from `keyspace analyze`). Default: the most recent"
        " complete run under ./runs.",
        None,
        short="-r",
    )
    picked: str = ""  # the line that says which run was taken, when --run was left out

    def __post_init__(self) -> None:
        if self.run is None:
            self.run, self.picked = latest_run("--run RUN")
        super().__post_init__()


def _k(row: dict) -> str:
    """A row's budget as the tables show it: '1/8', '2048 tok', or '-'."""
    from keyspace.reports.validate_figures import keep_label

    return keep_label(row) or "-"


def _print_table(doc: dict) -> None:
    from rich.table import Table

    from keyspace.reports.validate_report import headline
    from keyspace.reports.validate_tables import measured

    bases = ", ".join(doc.get("basis") or ["key"])
    table = Table(
        title=f"validate: {doc['model']['spec']} on {doc['dataset']['spec']} ({doc['rotary']}-RoPE, {bases} basis)"
    )
    for name in ("method", "basis", "d", "k", "k-mode", "ppl", "KV bytes", "seconds"):
        table.add_column(name, justify="left" if name in ("method", "basis") else "right")
    for r in doc["results"]:
        cells = (
            r["method"],
            r.get("basis") or "-",
            str(r["d"] or "-"),
            _k(r),
            r["k_mode"] or "-",
        )
        numbers = (r["ppl"], r["kv_bytes_fraction"])
        table.add_row(
            *cells,
            *("n/a" if measured(v) is None else f"{v:.3f}" for v in numbers),
            f"{r['seconds']:.0f}",
        )
    stdout.print(table)
    for entry in doc["recall"]:
        _print_recall(entry)
    for entry in doc["decode"]:
        stdout.print(
            f"decode {entry['method']} d={entry['d']} k={_k(entry)} ({entry.get('basis', 'key')} basis): token agreement {entry['token_agreement']:.3f} (teacher-forced {entry['forced_agreement']:.3f}), NLL of the dense continuation {entry['nll_sparse']:.3f} vs {entry['nll_dense']:.3f} dense"
        )
    for entry in (doc.get("speed") or {}).get("decode") or []:
        stdout.print(
            f"decode speed d={entry['d']} k={_k(entry)} (B={entry['batch']}, S={entry['seq']}): "
            f"{entry['loki_tokens_per_s']:.0f} tokens/s vs {entry['dense_tokens_per_s']:.0f} dense, "
            f"{entry['speedup']:.2f}x"
        )
    for entry in doc["passkey"]:
        basis = f" ({entry['basis']} basis)" if entry.get("basis") else ""
        setting = "" if entry["method"] == "full" else f" d={entry['d']} k={_k(entry)}"
        stdout.print(
            f"passkey {entry['method']}{setting}{basis} @ {entry['length']} tokens: {entry['correct']}/{entry['count']}"
        )
    if doc.get("tasks"):
        _print_tasks(doc["tasks"])
    stdout.print(headline(doc), soft_wrap=True, markup=False)


def _print_recall(entry: dict) -> None:
    """Mean recalls of one (basis, d, k), with Spearman ρ against key rank@90 and score rank@90."""
    score = entry.get("score_rank") is not None
    stdout.print(
        f"recall d={entry['d']} k={_k(entry)} ({entry.get('basis', 'key')} basis), mean over"
        f" (layer, query head) / Spearman ρ with key rank@90{' / score rank@90' if score else ''}:"
    )
    for field, name in (
        ("topk", "top-k recall"),
        ("mass", "attention-mass recall"),
        ("relative_mass", "mass / exact top-k mass"),
    ):
        table = entry[f"{field}_recall"]
        mean = sum(map(sum, table)) / sum(map(len, table))
        texts = []
        for prefix in ("", "score_") if score else ("",):
            rho = (entry.get(f"spearman_{prefix}rank_vs_{field}") or {}).get("rho")
            texts.append("n/a (no ranks at 0.9)" if rho is None else f"{rho:+.3f}")
        stdout.print(f"  {name}: {mean:.3f} / {' / '.join(texts)}")


def _print_tasks(rows: list[dict]) -> None:
    """One line per row, narrow enough for an 80-column terminal; the report has the rest."""
    from rich.table import Table

    table = Table(
        title="long-context tasks: accuracy [95% interval] over n prompts",
        box=None,
        padding=(0, 1, 0, 0),
        header_style="bold underline",
    )
    for name in ("task", "length", "method", "d", "k", "accuracy", "interval", "vs full", "n"):
        justify = "left" if name in ("task", "method") else "right"
        table.add_column(name, justify=justify, no_wrap=True)
    for r in rows:
        basis = r.get("basis")
        table.add_row(
            r["task"],
            str(r["length"]),
            r["method"] if basis in (None, "key") else f"{r['method']} ({basis})",
            str(r["d"] if r["d"] is not None else "-"),
            _k(r),
            f"{r['accuracy']:.2f}",
            f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]",
            f"{r['vs_full']:+.2f}" if "vs_full" in r else "-",
            str(r["count"]),
        )
    stdout.print(table)


@handle_errors
@config_options(ValidateArgs)
def command(
    config: ValidateArgs,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for validate.json and the report. Default: <run>/validate."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print validate.json on stdout.")] = False,
) -> None:
    """Perplexity of Loki and baselines at an equal budget, recall vs rank, real decoding, passkey,
    long-context tasks."""
    from keyspace.validate.run import validate_into

    if config.picked:
        stderr.print(config.picked, soft_wrap=True, markup=False)
    doc, paths = validate_into(
        config, out, log=lambda line: stderr.print(line, soft_wrap=True, markup=False)
    )
    if as_json:
        print_json(doc)
        return
    _print_table(doc)
    stdout.print(f"wrote {', '.join(str(p) for p in paths)}", soft_wrap=True, markup=False)


@handle_errors
def report_command(
    validate_json: Annotated[
        Path, typer.Argument(help="A validate.json, from `keyspace validate` or results/.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for validate.html and its PNGs. Default: reports/<run>/validate for"
            " <run>/validate/validate.json (beside the run's rank report), else reports/<file name>.",
        ),
    ] = None,
) -> None:
    """Render validate.html from a validate.json, of any keyspace version (fields a file lacks show
    as not recorded)."""
    from keyspace.reports.validate_report import load_validate_doc, write_validate_report

    doc = load_validate_doc(validate_json)
    if out is None:
        out = default_report_folder(validate_json)
    paths = write_validate_report(doc, out)
    stdout.print(f"Report: {paths[0]}", soft_wrap=True, markup=False)


def default_report_folder(validate_json: Path) -> Path:
    """reports/<run>/validate for a run's own validate.json (the rank report's sibling, so the
    two pages link), else reports/<the file's name>."""
    folder = validate_json.resolve().parent
    if validate_json.stem == "validate" and folder.name == "validate":
        return Path("reports") / folder.parent.name / "validate"
    return Path("reports") / validate_json.stem
