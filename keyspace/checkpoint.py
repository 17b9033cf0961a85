"""Checkpoints of a collect run: per-rank progress files, the folder lock, and the rank layout.

The progress file `progress/rank{r}.json` is a rank's commit point: it names the key shards
and the moments file of every committed chunk, each with its sha256.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keyspace.errors import KeyspaceError
from keyspace.store import (
    KINDS,
    Moments,
    load_moments,
    progress_moments_name,
    progress_path,
    save_moments,
    sha256_file,
    write_json_atomic,
)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if (
            world > 1
            and torch.distributed.is_available()
            and not torch.distributed.is_initialized()
        ):
            torch.distributed.init_process_group("gloo")
        return cls(int(os.environ.get("RANK", "0")), world)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class FolderLock:
    """An exclusive flock on `<out>/.lock-rank{r}`; the OS drops it if the process dies."""

    def __init__(self, out: Path, rank: int):
        self.path = out / f".lock-rank{rank}"
        self.handle: Any = None

    def __enter__(self) -> FolderLock:
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise KeyspaceError(
                f"another collector is writing to {self.path.parent}.",
                "Wait for it to finish, or choose another --out.",
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def load_progress(
    out: Path, rank: int, shape: tuple[int, int, int]
) -> tuple[dict, dict[str, Moments]]:
    """This rank's committed progress, with every file it names verified by sha256."""
    path = progress_path(out, rank)
    if not path.is_file():
        return {"chunks_done": 0, "shards": [], "moments": None}, {
            k: Moments.zeros(*shape) for k in KINDS
        }
    progress = json.loads(path.read_text())
    files = [(s["path"], s["sha256"]) for s in progress["shards"]] + [
        (progress["moments"]["path"], progress["moments"]["sha256"])
    ]
    for rel, digest in files:
        target = out / rel
        if not target.is_file() or sha256_file(target) != digest:
            raise KeyspaceError(
                f"{target} is missing or corrupt (sha256 does not match the run's record); the run cannot be resumed safely.",
                "Delete the run folder and collect again.",
            )
    return progress, load_moments(out / progress["moments"]["path"])


def commit_chunk(out: Path, rank: int, progress: dict, moments: dict[str, Moments]) -> None:
    chunks = progress["chunks_done"]
    rel = progress_moments_name(rank, chunks)
    save_moments(out / rel, moments)
    previous = progress.get("moments")
    progress["moments"] = {"path": rel, "sha256": sha256_file(out / rel)}
    write_json_atomic(progress_path(out, rank), progress)
    if previous and previous["path"] != rel:
        (out / previous["path"]).unlink(missing_ok=True)
