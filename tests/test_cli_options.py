"""Each CLI option is declared once, on its config field; the command is built from the fields."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest
import typer
from typer.testing import CliRunner

from keyspace.cli.main import app
from keyspace.collect.config import CollectConfig
from keyspace.errors import KeyspaceError
from keyspace.validate.config import TASK_HAYSTACKS, ValidateConfig


@pytest.mark.parametrize(
    "command, config_cls", [("validate", ValidateConfig), ("collect", CollectConfig)]
)
def test_every_config_field_is_an_option_of_its_command(command, config_cls):
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for f in fields(config_cls):
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
