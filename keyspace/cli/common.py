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

from keyspace.errors import KeyspaceError

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def handle_errors(fn: Callable) -> Callable:
    """Turn a KeyspaceError into one `Error: ...` line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyspaceError as err:
            if os.environ.get("KEYSPACE_DEBUG") == "1":
                raise
            print(err.one_line(), file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def print_json(data: Any) -> None:
    """Machine output: JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("KEYSPACE_NO_PROGRESS") != "1"
