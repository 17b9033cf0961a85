"""The keyspace command line. Parsing and printing only; the stages hold the logic.

Ctrl-C while the command line still loads (typer, rich, keyspace's own modules) is one
`Interrupted:` line and exit code 130, not a traceback. The console script's first import is
this package, and its first act is the excepthook below: from there on, until
`keyspace.cli.main.main` installs its handlers (and after them, for an interrupt outside any),
an uncaught KeyboardInterrupt is that line. `KEYSPACE_DEBUG=1` keeps the traceback.
"""

from __future__ import annotations

import os  # os and sys only, both loaded with Python itself: nothing here can be interrupted
import sys


def _caused_by_interrupt(err: BaseException | None) -> bool:
    """A KeyboardInterrupt, or an error it caused: Python wraps one raised inside a class body's
    `__set_name__` in a RuntimeError, and libraries re-raise it as their own errors."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _interrupt_hook(kind, value, tb, _previous=sys.excepthook) -> None:
    """sys.excepthook: an uncaught KeyboardInterrupt (or what it tore) is one line and the
    shell's exit code."""
    if not _caused_by_interrupt(value) or os.environ.get("KEYSPACE_DEBUG") == "1":
        _previous(kind, value, tb)
        return
    try:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot tear the line
        common = sys.modules.get("keyspace.cli.common")  # loaded: it tells SIGINT from SIGTERM
        code = common.stopped_exit_code() if common is not None else 130
    except BaseException:  # signal's own import interrupted, or a half-loaded `common`
        code = 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # a closed or broken stream: the line below still tries
            pass
    try:
        print(STOPPED_EARLY, file=sys.stderr, flush=True)
    finally:
        os._exit(code)  # an excepthook cannot set the exit code any other way


sys.excepthook = _interrupt_hook

STOPPED_EARLY = "Interrupted: stopped before starting. Hint: run the same command again."
