"""Ctrl-C while `keyspace` itself starts (its modules, typer, click, rich still importing): one
`Interrupted:` line and exit code 130, never a traceback."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ONE_LINE = "Interrupted: stopped before starting."
SCRIPT = Path(sys.executable).parent / "keyspace"  # the console script, as a user runs it

# Sends this process a real SIGINT when the module named in KEYSPACE_TEST_SIGINT_AT is first
# imported: the Ctrl-C lands inside that import, wherever the CLI is in its start-up.
HOOK = """
import os, signal, sys

class _SigintOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ.get("KEYSPACE_TEST_SIGINT_AT"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, _SigintOnImport())
"""


def _start(command, env=None):
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a terminal's foreground job has the default SIGINT disposition, whatever pytest's is
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.mark.parametrize(
    "module",
    [
        "keyspace.cli.main",
        "typer",
        "typer._click.core",
        "rich",
        "rich.console",
        "keyspace.errors",
        "keyspace.cli.common",
        "keyspace.cli.verify",
        "typer.rich_utils",  # imported once the command runs: `main` has its handlers by then
    ],
)
@pytest.mark.parametrize("entry", ["script", "-m"])
def test_ctrl_c_during_a_start_up_import_is_one_line(tmp_path, module, entry):
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "KEYSPACE_TEST_SIGINT_AT": module}
    env.pop("KEYSPACE_DEBUG", None)
    command = [str(SCRIPT)] if entry == "script" else [sys.executable, "-m", "keyspace"]
    proc = _start([*command, "verify", "--help"], env)
    err = proc.communicate(timeout=120)[1]
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Interrupted: "), err
    assert "Hint: " in lines[0], err


def _keyspace_frames(err: str) -> list[str]:
    """The traceback lines that point into the keyspace package (not the console script)."""
    return [line for line in err.splitlines() if re.search(r'File ".*[/\\]keyspace[/\\]', line)]


def test_ctrl_c_at_any_moment_of_the_start_is_never_a_traceback():
    """SIGINT after 0 to 0.6 s: the CLI stops with its one line, or finished first. A SIGINT
    before keyspace's first line runs is Python's own start (its site module, the editable
    install's finder, the import machinery finding `keyspace`): such a run shows no frame of
    keyspace and is counted apart; a traceback through any keyspace file fails."""
    outcomes = {"one line": 0, "finished": 0, "python start": 0}
    env = {k: v for k, v in os.environ.items() if k != "KEYSPACE_DEBUG"}
    for i in range(60):
        proc = _start([str(SCRIPT), "verify", "--help"], env)
        time.sleep(0.01 * i)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        when = f"SIGINT after {0.01 * i:.2f} s:\n{err}"
        if "Traceback" in err or (proc.returncode == -signal.SIGINT and not err):
            assert not _keyspace_frames(err), when
            outcomes["python start"] += 1
            continue
        if proc.returncode == 0:
            outcomes["finished"] += 1
            continue
        lines = err.strip().splitlines()
        assert proc.returncode == 130 and len(lines) == 1, when
        assert lines[0].startswith("Interrupted: ") and "Hint: " in lines[0], when
        outcomes["one line"] += 1
    assert outcomes["one line"] > 0, outcomes
