"""`keyspace collect`: stream a model's pre/post-RoPE keys into a run folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from keyspace.cli.common import handle_errors, print_json, progress_enabled, stderr, stdout


def _parse_max_tokens(value: str) -> int | None:
    return None if value == "all" else int(value) if value.lstrip("-").isdigit() else -1


@handle_errors
def command(
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Run folder to write (new, or an existing partial run with --resume).",
    ),
    model: str = typer.Option(
        "smollm2-135m",
        "--model",
        "-m",
        help="Alias (smollm2-135m), .gguf file, local HF folder or hub id.",
    ),
    dataset: str = typer.Option(
        "wikitext",
        "--dataset",
        "-d",
        help="wikitext, pydoc, a .txt file, or a folder of .txt/.jsonl/.parquet.",
    ),
    split: str = typer.Option("validation", help="Split for `wikitext` (validation, test, train)."),
    window: int = typer.Option(1024, help="Tokens per window (non-overlapping)."),
    max_tokens: str = typer.Option(
        "16384", help="Stop after this many tokens (whole windows), or `all`."
    ),
    keep_keys: str = typer.Option(
        "2048", help="Keys to keep on disk per layer: all, none, or a uniform sample of N tokens."
    ),
    dtype: str = typer.Option("float32", help="Model dtype: float32, float16, bfloat16."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    batch_size: int = typer.Option(1, help="Windows per forward pass."),
    shard_windows: int = typer.Option(4, help="Windows per shard and per resumable checkpoint."),
    resume: bool = typer.Option(False, "--resume", help="Continue a partial run in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Collect pre- and post-RoPE keys of every layer and KV head into a run folder."""
    from keyspace.collect import CollectConfig, collect
    from keyspace.errors import KeyspaceError

    max_tok = _parse_max_tokens(max_tokens)
    if max_tok == -1:
        raise KeyspaceError(
            f"--max-tokens must be a positive number or `all`, got {max_tokens!r}.",
            "Try --max-tokens 16384.",
        )
    cfg = CollectConfig(
        model=model,
        dataset=dataset,
        out=out,
        split=split,
        window=window,
        max_tokens=max_tok,
        keep_keys=keep_keys,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        shard_windows=shard_windows,
        resume=resume,
    )
    result = _run_with_progress(cfg, collect)
    summary = {
        "out": str(result.out),
        "state": result.state,
        "model": result.model_identity,
        "windows": result.windows,
        "tokens": result.tokens,
        "resumed_windows": result.resumed_windows,
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "shards": result.shards,
    }
    if as_json:
        print_json(summary)
        return
    stdout.print(f"[bold]Run {result.state}[/bold]: {result.out}")
    stdout.print(
        f"  {result.tokens} tokens in {result.windows} windows, {summary['tokens_per_second']} tokens/s, {result.shards} key shards"
    )
    stdout.print(f"  Next: keyspace rank-report {result.out} --out reports/{result.out.name}")


def _run_with_progress(cfg: Any, collect: Callable) -> Any:
    """Run `collect(cfg, on_progress)` under a rich bar on stderr (windows, tokens/s, ETA)."""
    if not progress_enabled():
        return collect(cfg)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("collect"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr) as bar:
        task = bar.add_task("collect", total=None, rate="-")
        first: dict[str, float] = {}

        def on_progress(done: int, total: int) -> None:
            if not first:  # the first call comes before the first window
                first.update(t=time.perf_counter(), n=done)
            elapsed = max(time.perf_counter() - first["t"], 1e-9)
            rate = (done - first["n"]) * cfg.window / elapsed
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f}")

        return collect(cfg, on_progress)
