"""The CLI shell: fast help without heavy imports, one-line errors."""

import subprocess
import sys

from typer.testing import CliRunner

from keyspace.cli.main import app

HEAVY = ("torch", "transformers", "triton", "matplotlib", "sklearn", "seaborn", "datasets")


def test_help_does_not_import_heavy_libraries():
    imports = "import sys; from keyspace.cli.main import app"
    code = f"{imports}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_command_has_help():
    runner = CliRunner()
    for name in ("collect", "analyze", "rank-report", "validate", "bench"):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, name


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "keyspace", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "collect" in out.stdout
