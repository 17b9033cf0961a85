"""`keyspace validate`: Loki's accuracy at chosen d and k, against baselines at the same budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keyspace.cli.common import handle_errors, print_json, stderr, stdout
from keyspace.cli.options import config_options
from keyspace.validate.config import ValidateConfig


def _print_table(doc: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"validate: {doc['model']['spec']} on {doc['dataset']['spec']} ({doc['rotary']}-RoPE basis)"
    )
    for name in ("method", "d", "k", "k-mode", "ppl", "KV bytes", "seconds"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in doc["results"]:
        cells = (
            r["method"],
            str(r["d"] or "-"),
            f"{r['k']:g}" if r["k"] else "-",
            r["k_mode"] or "-",
        )
        table.add_row(
            *cells, f"{r['ppl']:.3f}", f"{r['kv_bytes_fraction']:.3f}", f"{r['seconds']:.0f}"
        )
    stdout.print(table)
    for entry in doc["recall"]:
        stdout.print(
            f"recall d={entry['d']} k={entry['k']:g}, mean over (layer, query head) / Spearman ρ with rank@90:"
        )
        for field, name in (
            ("topk", "top-k recall"),
            ("mass", "attention-mass recall"),
            ("relative_mass", "mass / exact top-k mass"),
        ):
            table = entry[f"{field}_recall"]
            mean = sum(map(sum, table)) / sum(map(len, table))
            rho = (entry[f"spearman_rank_vs_{field}"] or {}).get("rho")
            rho_text = "n/a (no ranks at 0.9)" if rho is None else f"{rho:+.3f}"
            stdout.print(f"  {name}: {mean:.3f} / {rho_text}")
    for entry in doc["decode"]:
        stdout.print(
            f"decode {entry['method']}: token agreement {entry['token_agreement']:.3f} (teacher-forced {entry['forced_agreement']:.3f}), NLL of the dense continuation {entry['nll_sparse']:.3f} vs {entry['nll_dense']:.3f} dense"
        )
    for entry in (doc.get("speed") or {}).get("decode") or []:
        stdout.print(
            f"decode speed d={entry['d']} k={entry['k']:g} (B={entry['batch']}, S={entry['seq']}): "
            f"{entry['loki_tokens_per_s']:.0f} tokens/s vs {entry['dense_tokens_per_s']:.0f} dense, "
            f"{entry['speedup']:.2f}x"
        )
    for entry in doc["passkey"]:
        stdout.print(
            f"passkey {entry['method']} @ {entry['length']} tokens: {entry['correct']}/{entry['count']}"
        )


@handle_errors
@config_options(ValidateConfig)
def command(
    config: ValidateConfig,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Folder for validate.json and the report. Default: <run>/validate."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print validate.json on stdout.")] = False,
) -> None:
    """Perplexity of Loki and baselines at an equal budget, recall vs rank, real decoding, passkey."""
    from keyspace.validate.run import validate_into

    doc, paths = validate_into(config, out, log=lambda line: stderr.print(line))
    if as_json:
        print_json(doc)
        return
    _print_table(doc)
    stdout.print(f"wrote {', '.join(str(p) for p in paths)}", soft_wrap=True, markup=False)
