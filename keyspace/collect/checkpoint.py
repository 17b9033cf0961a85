"""Checkpoints of a collect run: per-rank progress files, the folder lock, and the rank layout.

The progress file `progress/rank{r}.json` is a rank's commit point: it names the key shards
and the moments file of every committed chunk, each with its sha256, and keeps a copy of the
run's manifest (without shards) so that a lost manifest can be rebuilt by `--resume`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError
from keyspace.runfolder.lock import FolderLock as FolderLock  # moved: analyze takes it too
from keyspace.runfolder.progress import read_progress
from keyspace.runfolder.store import (
    KINDS,
    MANIFEST,
    MOMENTS,
    OK,
    Moments,
    moments_file_state,
    moments_from_bytes,
    progress_moments_name,
    progress_path,
    read_verified,
    save_moments,
    sealed,
    shard_file_state,
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


@dataclass
class RankState:
    """A rank's committed progress after verification: what to keep, and what to recompute.

    redo: committed chunks whose key shards are missing or damaged (their moments are intact).
    notes: one line per problem found, for the user.
    """

    progress: dict
    moments: dict[str, Moments]
    redo: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.redo and not self.notes


def fresh_progress() -> dict:
    return {"chunks_done": 0, "shards": [], "moments": None}


def load_progress(
    out: Path, rank: int, shape: tuple[int, int, int], chunks_total: int | None = None
) -> RankState:
    """This rank's committed progress, with every file it names verified by sha256.

    A damaged progress file or moments file loses the rank's sums: it restarts from chunk 0.
    A damaged or missing shard only needs its chunk's keys again: it goes into `redo`.
    """
    zeros = {k: Moments.zeros(*shape) for k in KINDS}
    restart = f"rank {rank}'s windows will be recomputed from the start"
    try:
        progress = read_progress(out, rank, chunks_total)
        if progress is None:
            return RankState(fresh_progress(), zeros)
        moments = zeros
        if progress["chunks_done"]:
            record = progress["moments"]
            data = read_verified(out / record["path"], record["sha256"], "")
            moments = moments_from_bytes(data, out / record["path"], "", shape)
    except KeyspaceError as err:
        return RankState(fresh_progress(), zeros, notes=[f"{err.message} So {restart}."])
    redo = sorted(
        {
            s["index"]
            for s in progress["shards"]
            if shard_file_state(out / s["path"], s["sha256"]) != OK
        }
    )
    notes = [
        f"rank {rank}'s key shards of chunk {c} are missing or damaged; that chunk's windows will be recomputed."
        for c in redo
    ]
    return RankState(progress, moments, redo, notes)


def write_progress(out: Path, rank: int, progress: dict) -> None:
    write_json_atomic(progress_path(out, rank), sealed(progress), root=out)


def commit_chunk(out: Path, rank: int, progress: dict, moments: dict[str, Moments]) -> None:
    """Write this rank's moments, then its progress file: the commit point of a chunk."""
    chunks = progress["chunks_done"]
    rel = progress_moments_name(rank, chunks)
    previous = progress.get("moments")
    progress["moments"] = {"path": rel, "sha256": save_moments(out / rel, moments)}
    write_progress(out, rank, progress)
    if previous and previous["path"] != rel:
        (out / previous["path"]).unlink(missing_ok=True)


def final_problems(
    out: Path, manifest: dict, states: list[RankState], totals: list[int]
) -> list[str]:
    """Why a complete run's files do not match its verified progress ([] when they do).

    totals[r]: how many chunks rank r commits in all.
    """
    problems = [note for state in states for note in state.notes]
    for rank, (state, total) in enumerate(zip(states, totals, strict=True)):
        done = state.progress["chunks_done"]
        if not state.notes and done != total:
            problems.append(
                f"{progress_path(out, rank)} is missing or behind; rank {rank}'s chunks from"
                f" {done} on will be recomputed."
            )
    record = manifest.get("moments") or {}
    if moments_file_state(out / MOMENTS, record.get("sha256")) != OK:
        problems.append(f"{out / MOMENTS} is missing or damaged; it will be merged again.")
    listed = sorted((s["path"], s["sha256"]) for s in manifest["shards"])
    committed = sorted((s["path"], s["sha256"]) for st in states for s in st.progress["shards"])
    if not problems and listed != committed:
        problems.append(f"the shard list in {out / MANIFEST} disagrees with the progress files.")
    return problems
