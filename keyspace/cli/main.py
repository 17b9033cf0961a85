"""The typer app. Each command lives in its own module and imports heavy libraries lazily."""

from __future__ import annotations

import sys

from keyspace.cli import STOPPED_EARLY  # its excepthook covers this module's other lines

try:  # Ctrl-C while the CLI itself loads (before `main` installs its handlers): one line, no trace
    import typer

    from keyspace.cli import analyze, bench, collect, report, validate, verify
    from keyspace.cli.common import STOPPED, install_stop_handlers, stopped_exit_code
except KeyboardInterrupt:
    print(STOPPED_EARLY, file=sys.stderr)
    sys.exit(130)

try:  # typer 0.2x parses with its own copy of click; older typer uses click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors

# Bare `keyspace` raises this in click >= 8.2; a class nothing raises stands in before that.
NoArgsIsHelp = getattr(click_errors, "NoArgsIsHelpError", type("NoArgsIsHelp", (Exception,), {}))

app = typer.Typer(
    name="keyspace",
    help="Measure how low-dimensional attention keys are, and what Loki sparse attention buys.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
COMMANDS = {
    "collect": collect.command,
    "analyze": analyze.command,
    "rank-report": report.command,
    "validate": validate.command,
    "report": validate.report_command,
    "bench": bench.command,
    "verify": verify.command,
}
for name, command in COMMANDS.items():
    app.command(name)(command)


def usage_error_line(err) -> str:
    """A command-line mistake (a missing option, a value of the wrong type) as one line."""
    words = sys.argv[1:2]
    root = err.ctx is None or err.ctx.parent is None  # not (yet) inside a command
    command = err.ctx.command_path if err.ctx is not None else "keyspace"
    if root and words and words[0] in COMMANDS:
        command, root = f"{command} {words[0]}", False
    message = " ".join(err.format_message().split()).rstrip(".")
    what = "the commands" if root else "every option and its type"
    return f"Error: {message}. Hint: `{command} --help` lists {what}."


def main() -> None:
    """The console script: the app, with usage errors as one `Error:` line and exit code 2, and
    Ctrl-C / SIGTERM as one `Interrupted:` line and exit code 130 / 143."""
    install_stop_handlers()  # before any command imports torch
    try:
        code = _run_app()
    except KeyboardInterrupt:  # after the command returned, before the process ends
        code = None
    swallowed = code == 130 and not STOPPED["reported"]  # typer's own silent exit on Ctrl-C
    if STOPPED["signal"] is not None and (not code or swallowed):
        # the signal came, but something swallowed it or it came after the work: never exit 0,
        # never without its line
        print(STOPPED_EARLY.replace("before starting", "before finishing"), file=sys.stderr)
        code = stopped_exit_code()
    sys.exit(code)


def _run_app() -> int:
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelp as err:  # bare `keyspace`: the help, as before
        text = err.ctx.get_help() if err.ctx is not None else ""  # rich help prints itself
        if text:
            print(text)
        return 2
    except click_errors.UsageError as err:
        print(usage_error_line(err), file=sys.stderr)
        return 2
    except typer.Abort:  # Ctrl-C while click itself was parsing or reading input
        print(STOPPED_EARLY.replace("before starting", "before finishing"), file=sys.stderr)
        return stopped_exit_code()
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    main()
