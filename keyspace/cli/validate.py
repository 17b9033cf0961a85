"""`keyspace validate`: Loki's accuracy at chosen d and k, against baselines at the same budget."""

from __future__ import annotations

from pathlib import Path

import typer

from keyspace.cli.common import handle_errors, print_json, stderr, stdout

ALL_METHODS = "loki,full,exact-topk,h2o,pcaattn,sparq,streaming"


def _ints(text: str, option: str) -> tuple[int, ...]:
    from keyspace.errors import KeyspaceError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise KeyspaceError(
            f"{option} must be a comma list of positive integers, got {text!r}.",
            f"Example: {option} 2048,8192.",
        )
    return tuple(int(p) for p in parts)


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
    for entry in doc["passkey"]:
        stdout.print(
            f"passkey {entry['method']} @ {entry['length']} tokens: {entry['correct']}/{entry['count']}"
        )


@handle_errors
def command(
    run: Path = typer.Option(
        ..., "--run", "-r", help="Run folder with calibration (from `keyspace analyze`)."
    ),
    d: str = typer.Option(
        None,
        "--d",
        help="Low-rank dims: 32, 16,32,64, or auto:0.9 (per head rank). Default: head_dim/2.",
    ),
    k: str = typer.Option(
        "0.125", "--k", help="Fractions of context kept, in (0, 1]: 0.125 or 0.125,0.25."
    ),
    k_mode: str = typer.Option(
        "window", "--k-mode", help="Budget protocol: window, row, or window,row."
    ),
    gqa_select: str = typer.Option(
        "head",
        "--gqa-select",
        help="Loki under GQA: one token set per query head (paper) or per KV-head group.",
    ),
    rotary: str = typer.Option(
        "post", "--rotary", help="Which calibrated basis: post- or pre-RoPE keys."
    ),
    methods: str = typer.Option(ALL_METHODS, "--methods", help="Comma list of methods."),
    dataset: str = typer.Option(
        None,
        "--dataset",
        help="wikitext, pydoc, a .txt file or folder. Default: WikiText-2 test, else pydoc.",
    ),
    split: str = typer.Option("test", "--split", help="Split for wikitext."),
    max_tokens: int = typer.Option(
        2048, "--max-tokens", help="Evaluation tokens (whole windows) per method."
    ),
    window: int = typer.Option(1024, "--window", help="Tokens per evaluation window."),
    recall_windows: int = typer.Option(
        1, "--recall-windows", help="Windows used for the recall-vs-rank study (0: skip)."
    ),
    decode_prompts: int = typer.Option(
        2, "--decode-prompts", help="Prompts for the real-decoding check (0: skip)."
    ),
    decode_prompt_tokens: int = typer.Option(
        128, "--decode-prompt-tokens", help="Tokens per decode prompt."
    ),
    decode_tokens: int = typer.Option(
        16, "--decode-tokens", help="Greedy tokens generated per prompt."
    ),
    passkey_lengths: str = typer.Option(
        "", "--passkey-lengths", help="Passkey prompt lengths, e.g. 2048,8192 (empty: skip)."
    ),
    passkey_count: int = typer.Option(
        2, "--passkey-count", help="Passkey prompts per length (depths spread evenly)."
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Folder for validate.json and the report. Default: <run>/validate.",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    as_json: bool = typer.Option(False, "--json", help="Print validate.json on stdout."),
) -> None:
    """Perplexity of Loki and baselines at an equal budget, recall vs rank, real decoding, passkey."""
    from keyspace.loki.results import write_outputs
    from keyspace.validate import ValidateConfig, run_validate

    config = ValidateConfig(
        run=run,
        d=d,
        k=k,
        k_modes=k_mode,
        rotary=rotary,
        gqa_select=gqa_select,
        methods=methods,
        dataset=dataset,
        split=split,
        max_tokens=max_tokens,
        window=window,
        recall_windows=recall_windows,
        decode_prompts=decode_prompts,
        decode_tokens=decode_tokens,
        decode_prompt_tokens=decode_prompt_tokens,
        passkey_lengths=_ints(passkey_lengths, "--passkey-lengths"),
        passkey_count=passkey_count,
        device=device,
        dtype=dtype,
    )
    result = run_validate(config, log=lambda line: stderr.print(line))
    doc = result.to_json()
    paths = write_outputs(doc, out or run / "validate")
    if as_json:
        print_json(doc)
        return
    _print_table(doc)
    stdout.print(f"wrote {', '.join(str(p) for p in paths)}")
