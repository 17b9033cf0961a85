"""Corpora to token windows.

A dataset spec is `wikitext` (HF datasets, wikitext-2-raw-v1), `pydoc` (CPython's
`pydoc_data.topics`, always offline), a `.txt` file, or a folder of `.txt` / `.jsonl`
(field `text`) / `.parquet` (column `text`) files. Windowing is documented in docs/data.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyspace.errors import KeyspaceError, shell_command
from keyspace.runfolder.files import read_regular

DOC_SEPARATOR = "\n\n"
# A corpus file that is a FIFO, a device or a folder is refused before it is read.
SPECIAL_HINT = "Point --dataset at regular text files (.txt, .jsonl, .parquet)."
WIKITEXT_LOCAL_ENV = "KEYSPACE_WIKITEXT_DIR"
WIKITEXT_SPLIT_FILES = {
    "validation": "valid.txt",
    "valid": "valid.txt",
    "test": "test.txt",
    "train": "train.txt",
}


@dataclass
class Corpus:
    """Raw documents plus where they came from."""

    documents: list[str]
    source: str

    @property
    def text(self) -> str:
        return DOC_SEPARATOR.join(d for d in self.documents if d.strip())


def _pydoc_corpus() -> Corpus:
    from pydoc_data.topics import topics

    return Corpus([topics[name] for name in sorted(topics)], "pydoc_data.topics")


def _local_wikitext_dirs() -> list[Path]:
    candidates = []
    if os.environ.get(WIKITEXT_LOCAL_ENV):
        candidates.append(Path(os.environ[WIKITEXT_LOCAL_ENV]))
    candidates.append(Path.cwd().parent / "shared" / "data" / "wikitext-2")
    checkout = Path(__file__).resolve().parents[2]  # keyspace/collect/corpora.py -> the checkout
    candidates.append(checkout.parent / "shared" / "data" / "wikitext-2")
    return candidates


def _hub_reachable(host: str = "huggingface.co") -> bool:
    import socket

    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _wikitext_corpus(split: str) -> Corpus:
    """HF datasets first; if the hub is unreachable, a local WikiText-2 copy; else a clear error."""
    if not _hub_reachable():
        # Offline mode still reads the datasets cache, and fails in a second instead of retrying.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return Corpus(["".join(ds["text"])], f"hf:wikitext/wikitext-2-raw-v1/{split}")
    except Exception as err:  # datasets raises ConnectionError, ValueError, FileNotFoundError...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    name = WIKITEXT_SPLIT_FILES.get(split)
    for folder in _local_wikitext_dirs():
        if name and (folder / name).is_file():
            print(f"wikitext: hub unreachable; using local copy {folder / name}", file=sys.stderr)
            return Corpus([_read_text(folder / name)], f"file:{(folder / name).resolve()}")
    raise KeyspaceError(
        f"could not load wikitext ({split}) from the Hugging Face hub: {reason}",
        f"Pass a local file, e.g. --dataset ../shared/data/wikitext-2/valid.txt, or set {WIKITEXT_LOCAL_ENV}.",
    )


def _read_text(path: Path) -> str:
    """A text file as UTF-8; bad bytes, an unreadable or a special file are an error naming it."""
    data = read_regular(path, SPECIAL_HINT, follow_links=True)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise KeyspaceError(
            f"{path} is not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}).",
            f"Convert it first, e.g. `{shell_command('iconv', '-f', 'latin1', '-t', 'utf-8', path)}`.",
        ) from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            text = None
        if not isinstance(text, str):
            raise KeyspaceError(
                f"{path}:{line_no} is not a JSON object with a string 'text' field.",
                'Each line needs {"text": "..."}.',
            )
        docs.append(text)
    return docs


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_regular(path, SPECIAL_HINT, follow_links=True)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as err:  # ArrowInvalid, ArrowIOError, OSError: a damaged or foreign file
        raise KeyspaceError(
            f"{path} is not a readable parquet file ({str(err).splitlines()[0]}).",
            "Check the file, or pass text as .txt or .jsonl.",
        ) from None
    if "text" not in table.column_names:
        raise KeyspaceError(
            f"{path} has no 'text' column.", f"Columns: {', '.join(table.column_names)}."
        )
    texts = table.column("text").to_pylist()
    if not all(t is None or isinstance(t, str) for t in texts):
        raise KeyspaceError(
            f"{path}'s 'text' column holds {table.schema.field('text').type} values, not strings.",
            "Store the text as a string column.",
        )
    return [t for t in texts if t]


def _folder_corpus(folder: Path) -> Corpus:
    readers = {".txt": lambda p: [_read_text(p)], ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    files = sorted(p for p in folder.iterdir() if p.suffix in readers)
    if not files:
        raise KeyspaceError(
            f"folder {folder} holds no .txt, .jsonl or .parquet files.",
            "Point --dataset at text files.",
        )
    docs = [doc for p in files for doc in readers[p.suffix](p)]
    return Corpus(docs, f"folder:{folder.resolve()}")


def load_corpus(spec: str, split: str = "validation") -> Corpus:
    """Load a corpus; refuses an empty one."""
    corpus = _load_corpus(spec, split)
    if not corpus.text.strip():
        raise KeyspaceError(f"dataset {spec!r} is empty.", "Give a corpus with text in it.")
    return corpus


def _load_corpus(spec: str, split: str) -> Corpus:
    if spec == "pydoc":
        return _pydoc_corpus()
    if spec == "wikitext":
        return _wikitext_corpus(split)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_corpus(path)
    if os.path.lexists(path):  # a FIFO or a device is refused by its reader, not "not found"
        if path.suffix in (".jsonl", ".parquet"):
            return Corpus(
                _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path),
                f"file:{path.resolve()}",
            )
        return Corpus([_read_text(path)], f"file:{path.resolve()}")
    raise KeyspaceError(
        f"dataset {spec!r} not found.",
        "Use `wikitext`, `pydoc`, a .txt file, or a folder of .txt/.jsonl/.parquet files.",
    )


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


@dataclass
class TokenWindows:
    """groups: one (n_windows, length) int64 tensor of token ids per --window length, in cut
    order; plus provenance for the manifest."""

    groups: list
    source: str
    corpus_sha256: str
    corpus_tokens: int
    bos: bool
    fell_back: bool = False  # the auto --window's lengths did not fit: the first length alone

    @property
    def windows(self) -> Any:
        """(n_windows, window) token ids of a one-length cut."""
        if len(self.groups) != 1:
            raise ValueError("windows of several lengths have no single tensor; use groups")
        return self.groups[0]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(int(g.shape[1]) for g in self.groups)

    @property
    def counts(self) -> tuple[int, ...]:
        """Windows of each length."""
        return tuple(int(g.shape[0]) for g in self.groups)


def tokenize_windows(
    spec: str | Corpus,
    tokenizer: Any,
    window: int | tuple[int, ...],
    max_tokens: int | None,
    split: str = "validation",
    short_corpus_fallback: bool = False,
) -> TokenWindows:
    """Split a corpus (a spec, or one already loaded) into non-overlapping windows (docs/data.md).

    `window` one length, or a tuple of several: then each length gets ⌊max_tokens / lengths⌋
    tokens (of the corpus's tokens with `max_tokens` None or above them) in whole windows, cut
    consecutively: every window of the first length, then the next. With
    `short_corpus_fallback` (collect's auto --window), a corpus too short for one window of each
    length is cut into windows of the first length alone (`TokenWindows.fell_back`).
    """
    import torch

    lengths = tuple(window) if isinstance(window, tuple) else (window,)
    if any(n <= 1 for n in lengths):
        raise KeyspaceError(f"--window must be at least 2, got {window}.", "Try --window 1024.")
    corpus = spec if isinstance(spec, Corpus) else load_corpus(spec, split)
    spec = corpus.source if isinstance(spec, Corpus) else spec
    text = corpus.text
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = _adds_bos(tokenizer)
    fell_back = (
        short_corpus_fallback
        and len(lengths) > 1
        and _share(len(ids), lengths, max_tokens) < max(lengths)
    )
    if fell_back:
        lengths = lengths[:1]
    if len(lengths) == 1:
        counts = [_single_count(spec, ids, lengths[0], bos, max_tokens)]
    else:
        counts = _mixed_counts(spec, len(ids), lengths, max_tokens)
    groups, start = [], 0
    for length, n_windows in zip(lengths, counts, strict=True):
        body = length - 1 if bos else length
        chunks = torch.tensor(ids[start : start + n_windows * body], dtype=torch.long)
        chunks = chunks.view(n_windows, body)
        start += n_windows * body
        if bos:
            chunks = torch.cat(
                [torch.full((n_windows, 1), tokenizer.bos_token_id, dtype=torch.long), chunks],
                dim=1,
            )
        groups.append(chunks)
    digest = hashlib.sha256(text.encode()).hexdigest()
    return TokenWindows(groups, corpus.source, digest, len(ids), bos, fell_back)


def _single_count(spec: str, ids: list, window: int, bos: bool, max_tokens: int | None) -> int:
    body = window - 1 if bos else window
    n_windows = len(ids) // body
    if max_tokens is not None:
        n_windows = min(n_windows, max_tokens // window)
    if n_windows < 1:
        have = (
            f"{len(ids)} tokens"
            if max_tokens is None or max_tokens >= window
            else f"--max-tokens {max_tokens}"
        )
        raise KeyspaceError(
            f"dataset {spec!r} gives {have}, fewer than one window of {window}.",
            "Lower --window, raise --max-tokens, or give more text.",
        )
    return n_windows


def _share(corpus_tokens: int, lengths: tuple[int, ...], max_tokens: int | None) -> int:
    """Tokens each of several window lengths gets: the budget (--max-tokens, capped by the corpus)
    split equally."""
    budget = corpus_tokens if max_tokens is None else min(max_tokens, corpus_tokens)
    return budget // len(lengths)


def _mixed_counts(
    spec: str, corpus_tokens: int, lengths: tuple[int, ...], max_tokens: int | None
) -> list[int]:
    """Windows of each length: ⌊budget / len(lengths)⌋ tokens each, the budget capped by the corpus
    (so the cut always fits, with or without a BOS token per window)."""
    from keyspace.collect.config import check_window_budget

    check_window_budget(lengths, max_tokens)
    share = _share(corpus_tokens, lengths, max_tokens)
    short = [n for n in lengths if share < n]
    if short:
        raise KeyspaceError(
            f"dataset {spec!r} gives {corpus_tokens} tokens: split over {len(lengths)} window"
            f" lengths, {share} each, fewer than one window of {', '.join(map(str, short))}.",
            f"Give more text (at least {len(lengths) * max(lengths)} tokens), or shorter"
            " --window lengths.",
        )
    return [share // n for n in lengths]


def load_token_windows(
    spec: str, tokenizer: Any, window: int, max_tokens: int | None, split: str = "validation"
) -> Any:
    """(n_windows, window) int64 token ids."""
    return tokenize_windows(spec, tokenizer, window, max_tokens, split).windows
