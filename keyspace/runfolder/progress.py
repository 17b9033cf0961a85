"""Readers of a collect run's progress: which windows each rank takes, and its checked progress file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from keyspace.errors import FileSystemError, KeyspaceError
from keyspace.runfolder.store import KINDS, progress_path, read_regular, seal_problem


def rank_chunks(n_windows: int, rank: int, world: int, shard_windows: int) -> list[list[int]]:
    """The windows of each of this rank's chunks: rank r takes windows r, r+W, ..."""
    mine = list(range(rank, n_windows, world))
    return [mine[i : i + shard_windows] for i in range(0, len(mine), shard_windows)]


def _progress_problem(progress: object, chunks_total: int | None) -> str | None:
    """What makes a parsed progress file unusable, or None."""
    if not isinstance(progress, dict):
        return "it is not a JSON object"
    done, shards, record = (progress.get(k) for k in ("chunks_done", "shards", "moments"))
    if not isinstance(done, int) or isinstance(done, bool) or done < 0:
        return f"chunks_done is {done!r}"
    if chunks_total is not None and done > chunks_total:
        return f"it counts {done} chunks, but the rank has {chunks_total}"
    if not isinstance(shards, list):
        return f"shards is {type(shards).__name__}, not a list"
    for i, shard in enumerate(shards):
        if not _shard_ok(shard, done):
            return f"shards[{i}] is {shard!r}, not a shard entry of one of its {done} chunks"
    if done and not (
        isinstance(record, dict)
        and _inside(record.get("path"))
        and isinstance(record.get("sha256"), str)
    ):
        return f"moments is {record!r}, not {{path, sha256}} inside the run"
    return None


def _inside(path: object) -> bool:
    """A relative path that stays inside the run folder."""
    return isinstance(path, str) and not Path(path).is_absolute() and ".." not in Path(path).parts


def _count(value: object, high: int | None = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= 0
        and (high is None or value < high)
    )


def _shard_ok(shard: object, chunks_done: int) -> bool:
    """A shard entry as collect writes it: every field the manifest's shard table needs."""
    if not isinstance(shard, dict):
        return False
    return (
        _inside(shard.get("path"))
        and isinstance(shard.get("sha256"), str)
        and shard.get("kind") in KINDS
        and _count(shard.get("index"), chunks_done)
        and _count(shard.get("layer"))
        and _count(shard.get("tokens"))
        and _count(shard.get("rank", 0))
    )


def read_progress(out: Path, rank: int, chunks_total: int | None = None) -> dict | None:
    """A rank's progress file, parsed and checked; None when it has none. Raises KeyspaceError."""
    path = progress_path(out, rank)
    if not os.path.lexists(path):
        return None
    try:
        progress = json.loads(read_regular(path))  # a link, FIFO or device: refused, not read
        problem = seal_problem(progress) or _progress_problem(progress, chunks_total)
    except FileSystemError as err:
        problem = err.cause
    except KeyspaceError as err:
        problem = f"it {err.message.removeprefix(f'{path} ').rstrip('.')}"
    except ValueError as err:
        problem = f"it is not valid JSON ({err})"
    if problem:
        raise KeyspaceError(f"{path} is damaged: {problem}.")
    return progress
