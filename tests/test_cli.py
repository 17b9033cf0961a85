"""The CLI shell: fast help without heavy imports, one-line errors."""

import subprocess
import sys

import pytest
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
    for name in ("collect", "analyze", "rank-report", "validate", "bench", "verify"):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, name


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "keyspace", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "collect" in out.stdout


def test_bench_help_does_not_import_heavy_libraries():
    loaded = f"','.join(m for m in {HEAVY!r} if m in sys.modules)"
    code = (
        "import sys\nfrom keyspace.cli.main import app\ntry:\n    app(['bench', '--help'])\n"
        f"except SystemExit:\n    pass\nprint('heavy:' + {loaded})"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout and out.stdout.splitlines()[-1] == "heavy:"


def test_bench_reads_model_shapes_from_the_config(tmp_path):
    from keyspace.bench.kernels import default_points, model_geometry
    from keyspace.errors import KeyspaceError

    assert model_geometry("smollm2-135m") == (9, 3, 64)  # built in: no download
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "num_attention_heads": 12, "num_key_value_heads": 4,'
        ' "hidden_size": 768}'
    )
    assert model_geometry(str(tmp_path)) == (12, 4, 64)
    with pytest.raises(KeyspaceError, match="cannot read attention shapes"):
        model_geometry(str(tmp_path / "missing"))
    assert default_points(128) == (
        (32, 1 / 8), (32, 1 / 4), (16, 1 / 8), (16, 1 / 16), (64, 1 / 4)
    )  # fmt: skip
    assert default_points(32) == ((32, 1 / 8), (32, 1 / 4), (16, 1 / 8), (16, 1 / 16))
    assert default_points(8) == ((2, 1 / 8),)


def test_bench_cli_needs_cuda_and_checks_its_options(tmp_path):
    import torch

    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--model", "smollm2-135m", "--seq", "4096"])
    if not torch.cuda.is_available():
        assert result.exit_code == 2
        assert "Error: keyspace bench needs a CUDA GPU" in result.output
    result = runner.invoke(app, ["bench", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "cannot read attention shapes" in result.output
    result = runner.invoke(app, ["bench", "--d", "32"])
    assert result.exit_code == 2 and "--d and --k (or --budget) go together" in result.output
    result = runner.invoke(app, ["bench", "--heads", "32", "--kv-heads", "5"])
    assert result.exit_code == 2 and "not a multiple of kv_heads=5" in result.output


def keyspace_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "keyspace", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, message, hint",
    [
        (["validate", "--run", "x", "--task-batch", "abc"],
         "--task-batch must be a whole number from 1 to", "Hint: Example: --task-batch"),
        (["validate", "--run"], "Option '--run' requires an argument",
         "validate --help` lists every option"),
        (["validate", "--run", "x", "--speed=no"], "Option '--speed' does not take a value",
         "validate --help` lists every option"),
        (["bench", "--batch", "abc"], "--batch must be a whole number from 1 to",
         "Hint: Example: --batch"),
        (["bogus"], "No such command 'bogus'", "keyspace --help` lists the commands"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_error_line_with_exit_code_2(args, message, hint):
    out = keyspace_process(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {message}"), out.stderr
    assert hint in lines[0] and "Traceback" not in out.stderr


def test_bare_keyspace_still_shows_the_help():
    out = keyspace_process()
    assert out.returncode == 2 and "Usage" in out.stdout + out.stderr and "validate" in out.stdout
    assert keyspace_process("validate", "--help").returncode == 0


# ---- Ctrl-C and SIGTERM: one line, exit 130 / 143, never swallowed --------------------------

STOPPABLE = """
import sys, time
import keyspace.analyze.pca as stage

def analyze_and_write(run, config):
    import torch  # a heavy import, as a real command makes
    print("ready", flush=True)
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        if {swallow}:  # a library that swallows it: the command goes on and returns
            return None
        raise

stage.analyze_and_write = analyze_and_write
sys.argv = ["keyspace", "analyze", "some-run"]
from keyspace.cli.main import main
main()
"""


@pytest.mark.parametrize("swallow", [False, True])
@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_a_stop_signal_is_one_line_and_its_exit_code(signum, code, swallow):
    script = STOPPABLE.format(swallow=swallow)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == code, err
    assert len(lines) == 1 and lines[0].startswith("Interrupted: stopped before finishing."), err
    assert "Hint: " in lines[0]
