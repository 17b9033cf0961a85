"""`CollectConfig`: every collect option, declared once (the CLI is built from its fields).

No torch import here: the CLI reads this module at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keyspace.errors import KeyspaceError
from keyspace.options import option

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


def _parse_max_tokens(value: int | str | None) -> int | None:
    """`all` or None -> None; a count as int or digits -> int; anything else is a KeyspaceError."""
    if value is None or value == "all":
        return None
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeyspaceError(
            f"--max-tokens must be a positive number or `all`, got {value!r}.",
            "Try --max-tokens 16384.",
        )
    return value


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
    window: int = option("--window", "Tokens per window (non-overlapping).", 1024)
    max_tokens: int | None = option(
        "--max-tokens",
        "Stop after this many tokens (whole windows), or `all`.",
        16384,
        cli_type=str,
    )
    keep_keys: str = option(
        "--keep-keys",
        "Keys to keep on disk per layer: all, none, or a uniform sample of N tokens.",
        "2048",
    )
    dtype: str = option("--dtype", "Model dtype: float32, float16, bfloat16.", "float32")
    device: str = option("--device", "cpu, cuda or auto.", "auto")
    batch_size: int = option("--batch-size", "Windows per forward pass.", 1)
    shard_windows: int = option(
        "--shard-windows", "Windows per shard and per resumable checkpoint.", 4
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

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.max_tokens = _parse_max_tokens(self.max_tokens)
        if self.capture is not None:
            self.capture = parse_capture(self.capture)
        if self.window <= 1:
            raise KeyspaceError(
                f"--window must be at least 2, got {self.window}.", "Try --window 1024."
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise KeyspaceError(
                f"--max-tokens must be positive, got {self.max_tokens}.", "Try --max-tokens 16384."
            )
        if self.batch_size < 1 or self.shard_windows < 1:
            raise KeyspaceError(
                "--batch-size and --shard-windows must be at least 1.", "Try --batch-size 1."
            )
        if self.keep_keys not in ("all", "none") and not (
            self.keep_keys.isdigit() and int(self.keep_keys) > 0
        ):
            raise KeyspaceError(
                f"--keep-keys must be all, none or a positive count, got {self.keep_keys!r}.",
                "Try --keep-keys 2048.",
            )
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise KeyspaceError(f"unknown --device {self.device!r}.", "Use cpu, cuda or auto.")
