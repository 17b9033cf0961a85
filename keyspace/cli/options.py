"""Build a typer command's options from a config dataclass, so each option is declared once.

A field takes part when its metadata holds `flags` and `help` (see `keyspace.options.option`).
An integer field declared with `bounds` reaches the config as text: its `__post_init__` parses it
with `keyspace.options.parse_int`, the one parser of numeric options.
The decorated command receives `config`, built from those options, plus its own parameters.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

import typer


def _cli_type(hint: Any, override: Any) -> Any:
    """The type typer parses: the override, else the hint without its `| None`."""
    if override is not None:
        return override
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _option_parameters(config_cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(config_cls)
    params = []
    for f in fields(config_cls):
        meta = f.metadata
        if "flags" not in meta:
            continue
        default = ... if f.default is MISSING else f.default
        if meta["cli_type"] is str and isinstance(default, tuple):
            default = ",".join(map(str, default))
        integer = meta.get("bounds") is not None  # parsed by keyspace.options.parse_int
        option = typer.Option(
            default, *meta["flags"], help=meta["help"], metavar="INTEGER" if integer else None
        )
        annotation = _cli_type(hints[f.name], meta["cli_type"])
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
            )
        )
    return params


def config_options(config_cls: type) -> Callable[[Callable], Callable]:
    """Decorator: expose `config_cls`'s declared fields as options; call the command with `config`."""

    def decorate(command: Callable) -> Callable:
        config_params = _option_parameters(config_cls)
        names = {p.name for p in config_params}
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(name, p.annotation))
            for name, p in inspect.signature(command).parameters.items()
            if name != "config"
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(config=config_cls(**values), **kwargs)

        wrapper.__signature__ = inspect.Signature(config_params + own)
        return wrapper

    return decorate
