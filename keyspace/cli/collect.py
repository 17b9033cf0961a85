"""`keyspace collect`: not built yet."""

from __future__ import annotations

from keyspace.cli.common import handle_errors
from keyspace.errors import KeyspaceError


@handle_errors
def command() -> None:
    """Not built yet."""
    raise KeyspaceError("this command is not built yet.", "See the project's open issues.")
