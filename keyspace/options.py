"""Config dataclass fields that declare their own CLI option, so each option is written once.

`keyspace.cli.options.config_options` turns these fields into typer options. This module imports
no torch: the CLI reads the configs at start-up.
"""

from __future__ import annotations

from dataclasses import field

from keyspace.errors import KeyspaceError


def option(flag: str, help: str, default=None, short: str | None = None, cli_type=None) -> dict:
    """A dataclass field whose metadata declares its CLI option."""
    flags = (flag, short) if short else (flag,)
    metadata = {"flags": flags, "help": help, "cli_type": cli_type}
    if default is ...:  # required
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_positive_ints(text: str | tuple, option_name: str) -> tuple[int, ...]:
    """ "2048,8192" (or a tuple already) -> (2048, 8192); anything else is a KeyspaceError."""
    if isinstance(text, tuple):
        return text
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise KeyspaceError(
            f"{option_name} must be a comma list of positive integers, got {text!r}.",
            f"Example: {option_name} 2048,8192.",
        )
    return tuple(int(p) for p in parts)
