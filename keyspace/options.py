"""Config dataclass fields that declare their own CLI option, so each option is written once.

`keyspace.cli.options.config_options` turns these fields into typer options. This module imports
no torch: the CLI reads the configs at start-up.
"""

from __future__ import annotations

import re
from dataclasses import field, fields

from keyspace.errors import KeyspaceError

# Above this, a count of tokens, windows or prompts is a typo, not a request.
ABSURD = 10**9


def option(
    flag: str,
    help: str,
    default=None,
    short: str | None = None,
    cli_type=None,
    bounds: tuple[int, int] | None = None,
) -> dict:
    """A dataclass field whose metadata declares its CLI option.

    `bounds` (low, high) makes it an integer option: the CLI passes its text, and the config's
    `__post_init__` parses it with `parse_int` (via `parse_int_fields`).
    """
    flags = (flag, short) if short else (flag,)
    if bounds is not None:
        cli_type = str
    metadata = {"flags": flags, "help": help, "cli_type": cli_type, "bounds": bounds}
    if default is ...:  # required
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_int(
    value: object, option_name: str, low: int = 1, high: int = ABSURD, words: str = ""
) -> int:
    """The one parser of every numeric option: ASCII digits only (no sign, no `²`, no `١`), then
    `low <= n <= high`. Anything else is the same one-line KeyspaceError naming the option and the
    range; `words` names what else the option takes ("all or none"), for the message."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = value.strip() if isinstance(value, str) else ""
        # isdigit() alone takes '٣' and '²', and int() refuses more than 4300 digits: ASCII
        # digits only, and a number too long for any bound is out of range, not a traceback
        digits = text.isascii() and text.isdigit()
        number = int(text) if digits and len(text) <= 30 else (high + 1 if digits else None)
    if number is None or not low <= number <= high:
        shown = repr(value)
        alternatives = f", or {words}" if words else ""
        raise KeyspaceError(
            f"{option_name} must be a whole number from {low} to {high:,}{alternatives};"
            f" got {shown[:40] + '…' if len(shown) > 40 else shown}.",
            f"Example: {option_name} {max(low, min(high, 16))}.",
        )
    return number


# A decimal in ASCII: 0.125, .5, 1, 1.0, 1e-3. No sign, no nan/inf, no '١', no '1_0'.
DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_fraction(value: object, option_name: str) -> float:
    """A fraction option (`--k`): an ASCII decimal in (0, 1]. `float()` alone takes 'nan',
    'inf', '١' and '1_0': each is the same one-line KeyspaceError naming the option."""
    if isinstance(value, float) and not isinstance(value, bool):
        number: float | None = value
    else:
        text = value.strip() if isinstance(value, str) else ""
        ok = text.isascii() and len(text) <= 40 and DECIMAL.fullmatch(text)
        number = float(text) if ok else None
    if number is None or not 0.0 < number <= 1.0:  # a NaN fails the comparison too
        shown = repr(value)
        raise KeyspaceError(
            f"{option_name} must be a fraction in (0, 1], such as 0.125;"
            f" got {shown[:40] + '…' if len(shown) > 40 else shown}.",
            f"k is the fraction of the context kept, e.g. {option_name} 0.125.",
        )
    return number


def parse_fraction_list(values: list[str] | str | None, option_name: str) -> list[float]:
    """A repeated or comma-listed fraction option (--k 0.125,0.25 or --k 0.125 --k 0.25), every
    part checked by `parse_fraction`; an empty part is an error, not skipped."""
    values = [values] if isinstance(values, str) else values or []
    return [parse_fraction(part, option_name) for v in values for part in str(v).split(",")]


def parse_int_fields(config: object) -> None:
    """Parse, in place, every field of a config dataclass declared with `bounds`."""
    for f in fields(config):
        bounds = f.metadata.get("bounds")
        if bounds is not None:
            value = parse_int(getattr(config, f.name), f.metadata["flags"][0], *bounds)
            setattr(config, f.name, value)


def parse_int_list(
    text: str, option_name: str, low: int = 1, high: int = ABSURD
) -> tuple[int, ...]:
    """ "512,2048" -> (512, 2048), each part checked by `parse_int`; an empty part ("512,,", "")
    is the same one-line error, not skipped."""
    return tuple(parse_int(part, option_name, low, high) for part in str(text).split(","))


def parse_positive_ints(text: str | tuple, option_name: str, high: int = ABSURD) -> tuple[int, ...]:
    """ "2048,8192" (or a tuple already) -> (2048, 8192); each part is checked by `parse_int`."""
    parts = text if isinstance(text, tuple) else [p for p in text.split(",") if p.strip()]
    return tuple(parse_int(p, option_name, 1, high) for p in parts)


# Model placement (accelerate), shared by collect and validate: declared once here.
def device_map_option() -> dict:
    return option(
        "--device-map",
        "Spread the layers over devices (accelerate): auto, balanced, sequential, or a JSON"
        ' file {"module name": device}. Not with --device.',
        None,
    )


def max_memory_option() -> dict:
    return option(
        "--max-memory",
        "Per-device limits for --device-map auto|balanced|sequential: 0=70GiB,1=70GiB,cpu=200GiB.",
        None,
    )


def offload_folder_option() -> dict:
    return option(
        "--offload-folder",
        "Where --device-map puts weights mapped to disk. Default: a scratch folder, removed after.",
        None,
    )
