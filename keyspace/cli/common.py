"""Shared CLI plumbing: error handling, output streams, progress bars."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from keyspace.errors import FileSystemError, Interrupted, KeyspaceError

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def handle_errors(fn: Callable) -> Callable:
    """Turn a KeyspaceError into one `Error: ...` line on stderr and its exit code (2; 130 for
    Ctrl-C). An OSError that escaped a stage's own boundary is still one line naming the path."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyspaceError as err:
            _exit(err)
        except OSError as err:
            _exit(FileSystemError(err.filename or "a file", err, "write or read"))
        except KeyboardInterrupt:
            _exit(Interrupted("stopped before finishing.", "Run the same command again."))

    return wrapper


def _exit(err: KeyspaceError) -> None:
    if os.environ.get("KEYSPACE_DEBUG") == "1":
        raise err
    print(err.one_line(), file=sys.stderr)
    raise typer.Exit(err.exit_code) from None


def print_json(data: Any) -> None:
    """Machine output: JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("KEYSPACE_NO_PROGRESS") != "1"
