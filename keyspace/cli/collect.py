"""`keyspace collect`: stream a model's pre/post-RoPE keys into a run folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from keyspace.cli.common import handle_errors, print_json, progress_enabled, stderr, stdout
from keyspace.cli.defaults import default_run_folder
from keyspace.cli.options import config_options
from keyspace.collect.config import CollectConfig
from keyspace.errors import shell_command
from keyspace.options import option


@dataclass
class CollectArgs(CollectConfig):
    """CollectConfig as the command line gives it: --out may be left out."""

    out: Path | None = option(
        "--out",
        "Run folder to write (new, or an existing partial run with --resume)."
        " Default: runs/<model>-<dataset>, plus -w<window> at a --window other than 1024 or"
        " 1024,8192.",
        None,
        short="-o",
    )

    def __post_init__(self) -> None:
        # Named before the parse: the auto --window reads a resumed run's from this folder. An
        # explicit --window names it after, from the parsed label.
        named, auto = self.out is not None, self.window is None
        self.out = self.out if named else default_run_folder(self.model, self.dataset, None)
        super().__post_init__()
        if not named and not auto:
            self.out = default_run_folder(self.model, self.dataset, self.window)


@handle_errors
@config_options(CollectArgs)
def command(
    config: CollectConfig,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Collect pre- and post-RoPE keys of every layer and KV head into a run folder."""
    from keyspace.collect.runner import collect

    cfg = config
    result = _run_with_progress(cfg, collect)
    # What the auto --window gave up (a small --max-tokens, or a corpus too short for one window of
    # each length): said once the run exists, so a refused run prints its Error line alone.
    for note in (cfg.window_note, result.window_note):
        if note:
            stderr.print(note, soft_wrap=True)
    for line in result.repairs:
        stderr.print(f"Repaired: {line}", soft_wrap=True)
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
        "repaired": result.repairs,
    }
    if as_json:
        print_json(summary)
        return
    stdout.print(f"[bold]Run {result.state}[/bold]: ", end="", markup=True)  # "complete"
    stdout.print(str(result.out), soft_wrap=True, markup=False)
    speed = (
        "all collected before"
        if result.resumed_windows == result.windows
        else f"{summary['tokens_per_second']} tokens/s"
    )
    stdout.print(
        f"  {result.tokens} tokens in {result.windows} windows, {speed}, {result.shards} key shards"
    )
    report = shell_command(
        "keyspace", "rank-report", result.out, "--out", f"reports/{result.out.name}"
    )
    stdout.print(f"  Next: {report}", soft_wrap=True, markup=False)


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

        def on_progress(done: int, total: int, tokens: int) -> None:
            if not first:  # the first call comes before the first window
                first.update(t=time.perf_counter(), n=tokens)
            elapsed = max(time.perf_counter() - first["t"], 1e-9)
            rate = (tokens - first["n"]) / elapsed  # windows of several lengths: count tokens
            bar.update(task, completed=done, total=total, rate=f"{rate:,.0f}")

        return collect(cfg, on_progress)
