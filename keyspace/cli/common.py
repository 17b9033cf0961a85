"""Shared CLI plumbing: error handling, output streams, progress bars."""

from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from keyspace.errors import FileSystemError, Interrupted, KeyspaceError

# Markup and emoji codes are off: paths, model and dataset names reach these consoles, and rich
# would read `[/x]` in one as a closing tag (MarkupError) or `:x:` as an emoji. Styled output
# uses rich.text.Text, or passes markup=True with no user string in it.
stdout = Console(highlight=False, markup=False, emoji=False)
stderr = Console(stderr=True, highlight=False, markup=False, emoji=False)


# The signal that stopped the command (SIGINT or SIGTERM), once one came: see `on_stop_signal`;
# reported: whether its `Interrupted:` line is printed (`keyspace.cli.main` prints it otherwise).
STOPPED: dict[str, Any] = {"signal": None, "reported": False}


def stopped_exit_code() -> int:
    """130 after Ctrl-C, 143 after SIGTERM, as a shell reports a process those signals ended."""
    return 128 + (STOPPED["signal"] or signal.SIGINT)


def on_stop_signal(signum: int, frame: Any) -> None:
    """Ctrl-C and SIGTERM: remember which came, then stop the command as Ctrl-C does; while the
    interpreter runs its exit callbacks (logging's shutdown), only remember it."""
    STOPPED["signal"] = signum
    if not STOPPED.get("exiting"):
        raise KeyboardInterrupt


def _exiting() -> None:
    STOPPED["exiting"] = True


def install_stop_handlers() -> None:
    """Before any heavy import: a library that swallows KeyboardInterrupt still cannot make the
    command end as if nothing came (`keyspace.cli.main` checks `STOPPED` at the end)."""
    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGTERM, on_stop_signal)
    atexit.register(_exiting)  # runs before the exit callbacks registered earlier (LIFO)


def interrupted() -> Interrupted:
    err = Interrupted("stopped before finishing.", "Run the same command again.")
    err.exit_code = stopped_exit_code()
    return err


def handle_errors(fn: Callable) -> Callable:
    """Turn a KeyspaceError into one `Error: ...` line on stderr and its exit code (2; 130 for
    Ctrl-C, 143 for SIGTERM). An OSError that escaped a stage's own boundary is still one line
    naming the path; any exception raised while a stop signal is being handled (a library's
    import torn by it) is the interruption, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyspaceError as err:
            if isinstance(err, Interrupted):
                err.exit_code = stopped_exit_code()
            _exit(err)
        except OSError as err:
            if STOPPED["signal"] is not None:
                _exit(interrupted())
            _exit(FileSystemError(err.filename or "a file", err, "write or read"))
        except KeyboardInterrupt:
            _exit(interrupted())
        except Exception:
            if STOPPED["signal"] is None:
                raise
            _exit(interrupted())

    return wrapper


def _exit(err: KeyspaceError) -> None:
    if os.environ.get("KEYSPACE_DEBUG") == "1":
        raise err
    print(err.one_line(), file=sys.stderr)
    STOPPED["reported"] = STOPPED["reported"] or isinstance(err, Interrupted)
    raise typer.Exit(err.exit_code) from None


def print_json(data: Any) -> None:
    """Machine output: JSON on stdout, nothing else. A NaN or Inf is refused (bare `NaN` is not
    JSON), with an error naming where it is."""
    try:
        text = json.dumps(data, indent=2, default=str, allow_nan=False)
    except ValueError:
        raise KeyspaceError(
            f"the result holds a NaN or Inf at {nonfinite_path(data)}; it cannot be printed as JSON.",
            "Run `keyspace verify` on the run folder: its inputs hold values that are not finite.",
        ) from None
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def nonfinite_path(data: Any, path: str = "$") -> str | None:
    """The JSON path of the first NaN or Inf float in `data`, or None."""
    if isinstance(data, float) and (data != data or data in (float("inf"), float("-inf"))):
        return path
    if isinstance(data, dict):
        items = [(f"{path}.{key}", value) for key, value in data.items()]
    elif isinstance(data, (list, tuple)):
        items = [(f"{path}[{i}]", value) for i, value in enumerate(data)]
    else:
        items = []
    for where, value in items:
        found = nonfinite_path(value, where)
        if found:
            return found
    return None


def progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("KEYSPACE_NO_PROGRESS") != "1"
