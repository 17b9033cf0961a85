"""Each CLI option is declared once, on its config field; the command is built from the fields."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
import typer
from typer.testing import CliRunner

from keyspace.cli.collect import CollectArgs
from keyspace.cli.main import app
from keyspace.cli.validate import ValidateArgs
from keyspace.errors import KeyspaceError
from keyspace.validate.config import TASK_HAYSTACKS, ValidateConfig


@pytest.mark.parametrize(
    "command, config_cls", [("validate", ValidateArgs), ("collect", CollectArgs)]
)
def test_every_config_field_is_an_option_of_its_command(command, config_cls):
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for f in fields(config_cls):
        if "flags" not in f.metadata:  # not an option (what the command derives, e.g. `picked`)
            continue
        flag, *negative = f.metadata["flags"][0].split("/")  # "--speed/--no-speed": a switch
        assert params[f.name].opts[0] == flag, f.name
        assert params[f.name].secondary_opts == negative, f.name
        assert params[f.name].help == f.metadata["help"], f.name
        if f.default is not MISSING and not isinstance(f.default, tuple):
            assert params[f.name].default in (f.default, str(f.default)), f.name


def test_the_haystack_names_match_the_task_suite():
    from keyspace.tasks import HAYSTACKS

    assert TASK_HAYSTACKS == HAYSTACKS


def test_cli_values_reach_the_config_parsed(tmp_path, monkeypatch):
    """The options arrive in the config unchanged, and comma lists are parsed once, in the config."""
    seen = {}

    def fake_collect(config, on_progress=None):
        seen["config"] = config
        raise KeyspaceError("stop here.", "This is a test.")

    monkeypatch.setattr("keyspace.collect.runner.collect", fake_collect)
    args = ["collect", "--out", str(tmp_path / "r"), "--max-tokens", "all", "--window", "64"]
    result = CliRunner().invoke(app, [*args, "--keep-keys", "none", "--resume"])
    assert result.exit_code == 2 and "stop here." in result.stderr
    config = seen["config"]
    assert (config.max_tokens, config.window, config.keep_keys, config.resume) == (
        None,
        64,
        "none",
        True,
    )
    assert ValidateConfig(run=tmp_path, passkey_lengths="2048,4096").passkey_lengths == (2048, 4096)


@pytest.mark.parametrize("value", ["-5", "lots", "0"])
def test_bad_max_tokens_is_one_error_line(tmp_path, value):
    result = CliRunner().invoke(
        app, ["collect", "--out", str(tmp_path / "r"), "--max-tokens", value]
    )
    assert result.exit_code == 2 and result.stderr.startswith("Error: --max-tokens")
    assert "Traceback" not in result.output


# ---- every numeric option goes through one parser --------------------------------------------


@pytest.mark.parametrize("text", ["²", "١٢", "--5", "-5", "0", "1e3", "3.0", " ", "99999999999"])
def test_parse_int_accepts_ascii_digits_in_range_only(text):
    from keyspace.options import parse_int

    with pytest.raises(KeyspaceError, match=r"^--n must be a whole number from 1 to 1,000,000,000"):
        parse_int(text, "--n")


def test_parse_int_takes_digits_and_parsed_ints():
    from keyspace.options import parse_int

    assert parse_int(" 0042 ", "--n") == 42
    assert parse_int(7, "--n", 1, 7) == 7
    with pytest.raises(KeyspaceError, match="from 1 to 7, or all"):
        parse_int(8, "--n", 1, 7, words="all")
    with pytest.raises(KeyspaceError):
        parse_int(True, "--n")


COLLECT_NUMBERS = ["--keep-keys", "--max-tokens", "--window", "--batch-size", "--shard-windows"]


@pytest.mark.parametrize("flag", COLLECT_NUMBERS)
@pytest.mark.parametrize("value", ["²", "--5", "0", "-1", "10000000000000"])
def test_collect_numbers_are_one_error_line(tmp_path, flag, value):
    result = CliRunner().invoke(app, ["collect", "--out", str(tmp_path / "r"), f"{flag}={value}"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {flag} must be a whole number from ")
    assert " Hint: " in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag", ["--task-lengths", "--passkey-lengths", "--task-count"])
@pytest.mark.parametrize("value", ["²", "2048,²", "0", "-5", "10000000000000"])
def test_validate_numbers_are_one_error_line(tmp_path, flag, value):
    result = CliRunner().invoke(
        app, ["validate", "--run", str(tmp_path), "--tasks", "niah", f"{flag}={value}"]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {flag} must be a whole number from "), result.stderr


def test_validate_d_superscript_is_one_error_line():
    import torch

    from keyspace.validate.grid import parse_d

    for text in ("²", "0", "65", "-4"):
        with pytest.raises(KeyspaceError, match=r"^--d must be a whole number from 1 to 64"):
            parse_d(text, 64, (2, 2), None, "post")
    assert parse_d("16", 64, (1, 1), None, "post")[0].dims.equal(torch.full((1, 1), 16))


@pytest.mark.parametrize(
    "args", [["--head-dim", "0"], ["--heads", "0"], ["--batch", "0"], ["--seq", "0"]]
)
def test_bench_zero_is_an_error_not_the_default(args):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {args[0]} must be a whole number from 1"), (
        result.stderr
    )
