"""`verify`: check every file of a run folder against the sha256 the run recorded for it.

What each file is checked against (docs/run-format.md, "Verification"; names in keyspace.runfolder.store):
  the merged moments, the key shards   the manifest (written by collect)
  each rank's progress file            parsed and checked; it records its moments file and shards
  each rank's moments file             that progress file
  the ranks document                   its own content checksum (written by analyze), then
                                       field by field, and its moments_sha256 against the
                                       manifest's (an analysis of other moments is `stale`)
  the calibration                      the ranks document, then parsed: every value finite
Each file is streamed once through sha256. The manifest itself is the root of trust: it is
parsed and checked field by field when the run is opened. The merged moments are also parsed:
a NaN or Inf in them is `damaged` even under a matching sha256 (a resealed run).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from keyspace.errors import KeyspaceError
from keyspace.runfolder.analysis import (
    analyze_command,
    committed_calibration_path,
    read_calibration,
    read_ranks,
)
from keyspace.runfolder.progress import rank_chunks, read_progress
from keyspace.runfolder.store import (
    CALIBRATION,
    CHECKSUM_FIELD,
    DAMAGED,
    KINDS,
    MANIFEST,
    MISSING,
    MOMENTS,
    OK,
    RANKS,
    RunFolder,
    ShardRecord,
    calibration_path,
    file_state,
    progress_path,
    ranks_path,
)

COLLECT, ANALYZE = "collect", "analyze"
# An analysis intact in itself but computed from other moments than the run holds.
STALE = "stale"
STATE_WORDS = {STALE: "stale: computed from other moments than the run's, e.g. another run's"}


@dataclass
class FileCheck:
    """One file: its path in the run, the sha256 expected ("" where it has none), its state, and
    which stage writes it again (`collect` or `analyze`)."""

    path: str
    expected: str
    state: str
    writer: str


@dataclass
class Verification:
    run: Path
    state: str  # the manifest's: complete or partial
    analyzed: bool
    files: list[FileCheck] = field(default_factory=list)
    repair: dict[str, str] = field(default_factory=dict)  # writer -> the command that repairs

    @property
    def bad(self) -> list[FileCheck]:
        return [f for f in self.files if f.state != OK]

    def to_json(self) -> dict:
        return {
            "run": str(self.run),
            "state": self.state,
            "analyzed": self.analyzed,
            "ok": not self.bad,
            "files": [asdict(f) for f in self.files],
            "repair": {
                w: c for w, c in self.repair.items() if any(f.writer == w for f in self.bad)
            },
        }

    def error(self) -> KeyspaceError:
        """One error naming the bad files and the commands that repair them."""
        names = ", ".join(f"{f.path} ({STATE_WORDS.get(f.state, f.state)})" for f in self.bad)
        hints = [
            f"`{cmd}`" for w, cmd in self.repair.items() if any(f.writer == w for f in self.bad)
        ]
        return KeyspaceError(
            f"{len(self.bad)} of {len(self.files)} files in {self.run} failed verification: {names}.",
            f"Repair with {' then '.join(hints)}.",
        )

    def partial_error(self) -> KeyspaceError:
        return KeyspaceError(
            f"run {self.run} is partial: its files are intact, but no stage can use it yet.",
            f"Finish it with `{self.repair[COLLECT]}`.",
        )


def verify_run(path: str | Path) -> Verification:
    """Check every file of the run at `path`; opening a damaged manifest raises KeyspaceError."""
    run = RunFolder.open(path)
    result = Verification(run.path, run.manifest.state, ranks_path(run.path).exists())
    result.repair = {COLLECT: run.resume_command, ANALYZE: analyze_command(run.path)}
    result.files.append(FileCheck(MANIFEST, "", OK, COLLECT))
    if run.is_complete:
        result.files.append(_moments_check(run))
        result.files += [_shard_check(run, s) for s in run.manifest.shards]
    for rank in range(_world(run)):
        result.files += _progress_checks(run, rank)
    if run.is_complete and _lists_disagree(run):
        result.files[0].state = DAMAGED
    if result.analyzed or calibration_path(run.path).exists():
        result.files += _analysis_checks(run)
    return result


def _check(run: Path, rel: str, sha256: str | None, writer: str) -> FileCheck:
    return FileCheck(rel, sha256 or "", file_state(run / rel, sha256), writer)


def _shard_check(run: RunFolder, shard: ShardRecord) -> FileCheck:
    """A kept-keys shard: read once, its sha256, then its shape and values (finite)."""
    check = FileCheck(shard.path, shard.sha256, OK, COLLECT)
    if not (run.path / shard.path).is_file():
        check.state = MISSING
        return check
    try:
        run.read_shard(shard)
    except KeyspaceError:
        check.state = DAMAGED
    return check


def _moments_check(run: RunFolder) -> FileCheck:
    """The merged moments: their sha256, then their values (shape, finite)."""
    check = _check(run.path, MOMENTS, run.moments_sha256, COLLECT)
    if check.state == OK:
        try:
            run.moments(KINDS[0])
        except KeyspaceError:
            check.state = DAMAGED
    return check


def _world(run: RunFolder) -> int:
    """Ranks that wrote progress files; a run not written by collect (no world_size) has none.
    The manifest's parser bounds it by the run's windows."""
    return run.manifest.world_size or 0


def _lists_disagree(run: RunFolder) -> bool:
    """True when the manifest's shard list is not the one the (readable) progress files commit."""
    committed = []
    for rank in range(_world(run)):
        try:
            progress = read_progress(run.path, rank)
        except KeyspaceError:
            progress = None
        if progress is None:
            return False  # that progress file is reported as missing or damaged itself
        committed += [(s["path"], s["sha256"]) for s in progress["shards"]]
    listed = [(s.path, s.sha256) for s in run.manifest.shards]
    return _world(run) > 0 and sorted(listed) != sorted(committed)


def _chunks(run: RunFolder, rank: int) -> int | None:
    """How many chunks this rank commits in all, where the manifest says."""
    n, size = run.manifest.num_windows, run.manifest.shard_windows
    if not n or not size:
        return None
    return len(rank_chunks(n, rank, _world(run), size))


def _progress_checks(run: RunFolder, rank: int) -> list[FileCheck]:
    rel = progress_path(run.path, rank).relative_to(run.path).as_posix()
    total = _chunks(run, rank)
    try:
        progress = read_progress(run.path, rank, total)
    except KeyspaceError:
        return [FileCheck(rel, "", DAMAGED, COLLECT)]
    if run.is_complete and progress is not None and progress["chunks_done"] != total:
        return [FileCheck(rel, "", DAMAGED, COLLECT)]
    if progress is None:
        # A partial run that has not committed a chunk of this rank yet is not damaged.
        return [FileCheck(rel, "", MISSING, COLLECT)] if run.is_complete else []
    checks = [FileCheck(rel, "", OK, COLLECT)]
    if progress["chunks_done"]:
        record = progress["moments"]
        checks.append(_check(run.path, record["path"], record["sha256"], COLLECT))
    if not run.is_complete:  # a complete run's shards are checked against the manifest
        checks += [_check(run.path, s["path"], s["sha256"], COLLECT) for s in progress["shards"]]
    return checks


def _analysis_checks(run: RunFolder) -> list[FileCheck]:
    """ranks.json (checksum, fields, pairing with the manifest's moments) and the calibration
    it records (sha256, values)."""
    try:
        doc = read_ranks(run.path)
    except KeyspaceError:
        doc = None
        ranks = FileCheck(RANKS, "", DAMAGED, ANALYZE)
    else:
        ranks = FileCheck(
            RANKS, (doc or {}).get(CHECKSUM_FIELD, ""), OK if doc else MISSING, ANALYZE
        )
    if doc is not None and doc.get("moments_sha256") != run.moments_sha256:
        ranks.state = STALE  # another run's analysis, or one of moments collected since
    expected = (doc or {}).get("calibration_sha256")
    calibration = FileCheck(CALIBRATION, expected or "", MISSING, ANALYZE)
    path = committed_calibration_path(run.path, doc) if doc else calibration_path(run.path)
    if path.exists():
        calibration.state = file_state(path, expected) if expected else DAMAGED
    if calibration.state == OK:
        try:
            read_calibration(run.path, doc)
        except KeyspaceError:
            calibration.state = DAMAGED
    return [ranks, calibration]
