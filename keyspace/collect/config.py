"""`CollectConfig`: every collect option, declared once (the CLI is built from its fields).

No torch import here: the CLI reads this module at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from keyspace.errors import KeyspaceError
from keyspace.models.placement import placement_from_options
from keyspace.options import (
    device_map_option,
    max_memory_option,
    offload_folder_option,
    option,
    parse_int,
    parse_int_fields,
)

# What --capture can record, in this order. Keys always: every later stage needs them.
CAPTURES = ("keys", "queries")


def parse_capture(value: str | tuple) -> tuple[str, ...]:
    """ "keys,queries" (any order, or a tuple already) -> ("keys", "queries"); "keys" -> ("keys",)."""
    parts = value if isinstance(value, tuple) else tuple(p.strip() for p in value.split(","))
    if "keys" not in parts or not set(parts) <= set(CAPTURES):
        raise KeyspaceError(
            f"--capture must be keys or keys,queries, got {','.join(parts)!r}.",
            "Try --capture keys,queries (the default) or --capture keys.",
        )
    return tuple(c for c in CAPTURES if c in parts)


# --window: the bounds of one length, and how many lengths one run may mix.
WINDOW_BOUNDS = (2, 1 << 20)
MAX_WINDOW_LENGTHS = 8
_LIST_HINT = "Example: --window 1024 or --window 1024,8192."


def parse_window_lengths(value: int | str | tuple) -> tuple[int, ...]:
    """ "1024" -> (1024,); "1024,8192" (or "1024+8192", the manifest's form) -> (1024, 8192).

    Each length goes through `parse_int` (2 .. 2^20); an empty part, a repeated length or more
    than MAX_WINDOW_LENGTHS lengths is a KeyspaceError. The order is kept: it is the cut order.
    """
    if isinstance(value, tuple):
        parts: list = list(value)
    elif isinstance(value, str):
        parts = re.split(r"[,+]", value)
    else:
        parts = [value]
    if len(parts) == 1:
        return (parse_int(parts[0], "--window", *WINDOW_BOUNDS),)
    if any(isinstance(p, str) and not p.strip() for p in parts):
        raise KeyspaceError(f"--window has an empty length in {value!r}.", _LIST_HINT)
    if len(parts) > MAX_WINDOW_LENGTHS:
        raise KeyspaceError(
            f"--window lists {len(parts)} lengths; at most {MAX_WINDOW_LENGTHS} can be mixed.",
            _LIST_HINT,
        )
    lengths = tuple(parse_int(p, "--window", *WINDOW_BOUNDS) for p in parts)
    repeated = sorted({n for n in lengths if lengths.count(n) > 1})
    if repeated:
        raise KeyspaceError(
            f"--window lists {', '.join(map(str, repeated))} more than once ({value!r}).",
            "Give each length once, e.g. --window 1024,8192.",
        )
    return lengths


def window_label(lengths: tuple[int, ...]) -> int | str:
    """What the manifest (and the default run name) records: 1024 for one length, "1024+8192"."""
    return lengths[0] if len(lengths) == 1 else "+".join(map(str, lengths))


def check_window_budget(lengths: tuple[int, ...], max_tokens: int | None) -> None:
    """Several lengths share --max-tokens equally; refuse a share below one window of each."""
    if len(lengths) < 2 or max_tokens is None:
        return
    share, longest = max_tokens // len(lengths), max(lengths)
    if share < longest:
        short = ", ".join(str(n) for n in lengths if n > share)
        raise KeyspaceError(
            f"--max-tokens {max_tokens} split over {len(lengths)} window lengths gives each"
            f" {share} tokens, fewer than one window of {short}.",
            f"Use --max-tokens {len(lengths) * longest} or more ({len(lengths)} × {longest}),"
            " or shorter --window lengths.",
        )


# The auto --window (none given) of a new run: these lengths mixed when --max-tokens leaves each a
# whole window, else the first alone. Why these: docs/notes/adaptive-loki.md.
AUTO_WINDOW_LENGTHS = (1024, 8192)
DEFAULT_MAX_TOKENS = 32768  # 16384 tokens of each auto length


def auto_window(max_tokens: int | None) -> tuple[tuple[int, ...], str]:
    """(the auto --window lengths of a new run, the note to print or ""): AUTO_WINDOW_LENGTHS when
    --max-tokens is `all` (None) or has room for one window of each, else the first length alone
    and a note that says what that loses."""
    lengths, short = AUTO_WINDOW_LENGTHS, AUTO_WINDOW_LENGTHS[0]
    needed = len(lengths) * max(lengths)
    if max_tokens is None or max_tokens >= needed:
        return lengths, ""
    note = (
        f"Note: --max-tokens {max_tokens} is below {needed}, so every window has {short} tokens;"
        f" the query-aware basis from them can lose long-range retrieval past {short} tokens."
        f" For the default {window_label(lengths)} windows, give --max-tokens {DEFAULT_MAX_TOKENS}."
    )
    return (short,), note


def _recorded_window(out: Path) -> int | str | None:
    """The --window label the run in `out` recorded (None where there is none to read: collect
    then says why). Imported here: the run folder's reader loads torch, and only --resume needs it."""
    from keyspace.runfolder.store import run_window

    return run_window(out)


def _parse_max_tokens(value: int | str | None) -> int | None:
    """`all` or None -> None; a count -> int (`parse_int`); anything else is a KeyspaceError."""
    if value is None or value == "all":
        return None
    return parse_int(value, "--max-tokens", words="all")


def _parse_keep_keys(value: str) -> str:
    """`all`, `none`, or a count, kept as its digits (the manifest records the text)."""
    if value in ("all", "none"):
        return value
    return str(parse_int(value, "--keep-keys", words="all or none"))


@dataclass
class CollectConfig:
    """What to collect, from which model and corpus, into which run folder."""

    out: Path = option(
        "--out",
        "Run folder to write (new, or an existing partial run with --resume).",
        ...,
        short="-o",
    )
    model: str = option(
        "--model",
        "Alias (smollm2-135m), .gguf file, local HF folder or hub id.",
        "smollm2-135m",
        short="-m",
    )
    dataset: str = option(
        "--dataset",
        "wikitext, pydoc, a .txt file, or a folder of .txt/.jsonl/.parquet.",
        "wikitext",
        short="-d",
    )
    split: str = option("--split", "Split for `wikitext` (validation, test, train).", "validation")
    window: int | str | None = option(
        "--window",
        "Tokens per window (non-overlapping). A comma list (1024,8192) mixes lengths: --max-tokens"
        " is split equally, floor(max_tokens / lengths) tokens each in whole windows of that"
        " length, cut one after the other (all of the first length, then the next); a batch"
        " never mixes lengths. Default: 1024,8192 when --max-tokens is all or at least 16384,"
        " else 1024; with --resume, what the run recorded.",
        None,
        cli_type=str,
    )
    max_tokens: int | None = option(
        "--max-tokens",
        "Stop after this many tokens (whole windows), or `all`.",
        DEFAULT_MAX_TOKENS,
        cli_type=str,
    )
    keep_keys: str = option(
        "--keep-keys",
        "Keys to keep on disk per layer: all, none, or a uniform sample of N tokens.",
        "2048",
    )
    dtype: str = option("--dtype", "Model dtype: float32, float16, bfloat16.", "float32")
    device: str | None = option(
        "--device", "cpu, cuda or auto (the default). Not with --device-map.", None
    )
    device_map: str | None = device_map_option()
    max_memory: str | None = max_memory_option()
    offload_folder: Path | None = offload_folder_option()
    batch_size: int = option("--batch-size", "Windows per forward pass.", 1, bounds=(1, 1 << 16))
    shard_windows: int = option(
        "--shard-windows",
        "Windows per shard and per resumable checkpoint.",
        4,
        bounds=(1, 1 << 20),
    )
    capture: tuple[str, ...] | None = option(
        "--capture",
        "What to record: keys,queries (queries feed the score spectrum and the query-aware"
        " basis) or keys. Default: keys,queries for a new run; with --resume, what the run"
        " recorded.",
        None,
        cli_type=str,
    )
    resume: bool = option("--resume", "Continue a partial run in --out.", False)
    window_note: str = ""  # the line that says what the auto --window gave up, when it did
    window_auto: bool = False  # the lengths are the auto choice of a new run (no --window)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        parse_int_fields(self)
        self.max_tokens = _parse_max_tokens(self.max_tokens)
        if self.window is None:
            self.window, self.window_note = self._auto_window()
        # One length stays an int; several become the manifest's label "1024+8192".
        self.window = window_label(parse_window_lengths(self.window))
        check_window_budget(self.window_lengths, self.max_tokens)
        self.keep_keys = _parse_keep_keys(self.keep_keys)
        if self.capture is not None:
            self.capture = parse_capture(self.capture)
        self.placement = placement_from_options(
            self.device, self.device_map, self.max_memory, self.offload_folder
        )
        if self.placement is not None:
            return
        self.device = self.device or "auto"
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise KeyspaceError(f"unknown --device {self.device!r}.", "Use cpu, cuda or auto.")

    def _auto_window(self) -> tuple[int | str | tuple[int, ...], str]:
        """No --window: a resumed run keeps what it recorded (as --capture does); a new run gets
        `auto_window`."""
        recorded = _recorded_window(self.out) if self.resume else None
        if recorded is not None:
            return recorded, ""
        self.window_auto = True
        return auto_window(self.max_tokens)

    @property
    def window_lengths(self) -> tuple[int, ...]:
        """The --window lengths, in cut order: (1024,) or (1024, 8192)."""
        return parse_window_lengths(self.window)
