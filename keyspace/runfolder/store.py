"""The run folder: the contract between collect and every later stage.

This module is the only one that knows the folder's file names; every other module asks it. The
manifest's schema lives in `keyspace.runfolder.manifest`, the moments' in
`keyspace.runfolder.moments`; both are re-exported here.
Every write goes through `write_bytes_atomic` and every read of a run file through `read_verified`,
which checks the sha256 the run recorded (both from `keyspace.runfolder.files`, the one error boundary).

Layout (documented in docs/run-format.md):
  manifest.json                              identity, shapes, shards with sha256, state
  moments.safetensors                        float64 running moments per kind (merged over ranks):
                                             keys as `{kind}.*`, queries as `query.{kind}.*`
  keys/{kind}/layer{LL}/r{R}-{CCCCC}.safetensors   kept keys: `keys` (tokens, kv_heads, head_dim),
                                             `positions` (tokens,) int64, `windows` (tokens,) int64
  progress/rank{R}.json, progress/moments.rank{R}.c{CCCCC}.safetensors   collect's commit points
  ranks.json, calibration.safetensors        written by analyze (ranks.json records both hashes)
  validate/                                  validate's default output folder
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from keyspace.errors import FileSystemError, KeyspaceError, shell_command

# The boundary and the integrity checks live in keyspace.runfolder.files; stages use them from here.
from keyspace.runfolder.files import CHECKSUM_FIELD as CHECKSUM_FIELD
from keyspace.runfolder.files import DAMAGED as DAMAGED
from keyspace.runfolder.files import MISSING as MISSING
from keyspace.runfolder.files import OK as OK
from keyspace.runfolder.files import check_writable as check_writable
from keyspace.runfolder.files import content_checksum as content_checksum
from keyspace.runfolder.files import file_state as file_state
from keyspace.runfolder.files import parse_tensors as parse_tensors
from keyspace.runfolder.files import read_file as read_file
from keyspace.runfolder.files import read_regular as read_regular
from keyspace.runfolder.files import read_verified as read_verified
from keyspace.runfolder.files import save_tensors as save_tensors
from keyspace.runfolder.files import seal_problem as seal_problem
from keyspace.runfolder.files import sealed as sealed
from keyspace.runfolder.files import sha256_file as sha256_file
from keyspace.runfolder.files import write_bytes_atomic as write_bytes_atomic
from keyspace.runfolder.files import write_json_atomic as write_json_atomic
from keyspace.runfolder.manifest import STATE_COMPLETE as STATE_COMPLETE
from keyspace.runfolder.manifest import STATE_PARTIAL as STATE_PARTIAL
from keyspace.runfolder.manifest import Manifest
from keyspace.runfolder.manifest import ShardRecord as ShardRecord
from keyspace.runfolder.moments import KINDS as KINDS
from keyspace.runfolder.moments import MOMENTS as MOMENTS
from keyspace.runfolder.moments import QUERY_KINDS as QUERY_KINDS
from keyspace.runfolder.moments import Moments as Moments
from keyspace.runfolder.moments import moments_from_bytes as moments_from_bytes
from keyspace.runfolder.moments import query_kind as query_kind
from keyspace.runfolder.moments import save_moments as save_moments

MANIFEST = "manifest.json"
KEYS_DIR = "keys"
PROGRESS_DIR = "progress"
LOCK_PREFIX = ".lock-rank"
RANKS = "ranks.json"
CALIBRATION = "calibration.safetensors"
VALIDATE_DIR = "validate"
# The explained-variance threshold analyze always writes and `--d auto` / recall read by default.
DEFAULT_THRESHOLD = 0.9


def shard_name(kind: str, layer: int, rank: int, chunk: int) -> str:
    """A key shard's path relative to the run folder."""
    return f"{KEYS_DIR}/{kind}/layer{layer:02d}/r{rank}-{chunk:05d}.safetensors"


def lock_path(out: str | Path, rank: int) -> Path:
    """A rank's collector lock (an flock; the OS drops it when the process dies). analyze takes
    rank 0's."""
    return Path(out) / f"{LOCK_PREFIX}{rank}"


def is_lock_file(path: Path) -> bool:
    return path.name.startswith(LOCK_PREFIX)


def progress_path(out: Path, rank: int) -> Path:
    """A rank's commit point: the progress file naming its committed shards and moments."""
    return Path(out) / PROGRESS_DIR / f"rank{rank}.json"


def progress_moments_name(rank: int, chunk: int) -> str:
    """A rank's moments after `chunk` committed chunks, relative to the run folder."""
    return f"{PROGRESS_DIR}/moments.rank{rank}.c{chunk:05d}.safetensors"


def ranks_path(run: str | Path) -> Path:
    return Path(run) / RANKS


def calibration_path(run: str | Path) -> Path:
    return Path(run) / CALIBRATION


def validate_dir(run: str | Path) -> Path:
    return Path(run) / VALIDATE_DIR


def write_manifest(run: str | Path, manifest: dict | Manifest) -> None:
    doc = manifest.to_json() if isinstance(manifest, Manifest) else manifest
    write_json_atomic(Path(run) / MANIFEST, sealed(doc))


# The placement options a collect records as given (manifest `placement_options`), in order.
PLACEMENT = ("device_map", "max_memory", "offload_folder")


def resume_command(manifest: dict | Manifest, run: str | Path) -> str:
    """The `keyspace collect --resume` command that continues or repairs the run `manifest` describes."""
    if isinstance(manifest, Manifest):
        manifest = manifest.to_json()
    model, dataset = manifest.get("model") or {}, manifest.get("dataset") or {}
    model, dataset = (d if isinstance(d, dict) else {} for d in (model, dataset))
    words: list[object] = ["keyspace", "collect", "--resume", "--out", run]
    world = manifest.get("world_size") or 1
    if isinstance(world, int) and world > 1:
        words[:2] = ["torchrun", "--nproc-per-node", world, "-m", "keyspace", "collect"]
    flags = (
        ("--model", model.get("spec")),
        ("--dataset", dataset.get("spec")),
        ("--split", dataset.get("split")),
        ("--window", manifest.get("window")),
        (
            "--max-tokens",
            manifest.get("max_tokens") or ("all" if "max_tokens" in manifest else None),
        ),
        ("--keep-keys", manifest.get("keep_keys")),
        ("--dtype", manifest.get("dtype")),
        ("--shard-windows", manifest.get("shard_windows")),
        ("--capture", ",".join(run_capture(manifest))),
    )
    placement = manifest.get("placement_options")  # absent in runs placed on one device
    placement = placement if isinstance(placement, dict) else {}
    flags += tuple((f"--{name.replace('_', '-')}", placement.get(name)) for name in PLACEMENT)
    for flag, value in flags:
        if value is not None and not isinstance(value, (dict, list)):
            words += [flag, value]
    return shell_command(*words)


def run_capture(manifest: dict | Manifest) -> tuple[str, ...]:
    """What a run captured; runs written before queries existed captured keys only."""
    if isinstance(manifest, Manifest):
        return manifest.capture
    capture = manifest.get("capture")
    if isinstance(capture, list) and all(isinstance(c, str) for c in capture):
        return tuple(capture)
    return ("keys",)


def run_window(path: str | Path) -> int | str | None:
    """The --window a run recorded (1024, or "1024+8192"), as --resume reads it: the manifest, else
    the copy kept with rank 0's progress. None where neither can be read."""
    path = Path(path)
    if not (path / MANIFEST).exists() and not progress_path(path, 0).is_file():
        return None
    try:
        doc: dict | None = RunFolder.open(path).manifest.to_json()
    except KeyspaceError:
        doc = unverified_manifest(path)
    return None if doc is None else doc.get("window")


def _read_state(path: Path, sha256: str | None) -> tuple[str, bytes]:
    """(MISSING, b""), (DAMAGED, b"") or (OK, the bytes whose sha256 is `sha256`)."""
    if not path.is_file():
        return MISSING, b""
    try:
        data = read_verified(path, sha256, "")
    except KeyspaceError:
        return DAMAGED, b""
    return OK, data


def moments_file_state(path: Path, sha256: str | None) -> str:
    """OK, MISSING or DAMAGED: the sha256, then the values (a NaN under a resealed hash is DAMAGED)."""
    state, data = _read_state(path, sha256)
    if state == OK:
        try:
            moments_from_bytes(data, path, "")
        except KeyspaceError:
            return DAMAGED
    return state


def shard_file_state(path: Path, sha256: str | None) -> str:
    """OK, MISSING or DAMAGED: the sha256, then the kept keys present and finite."""
    state, data = _read_state(path, sha256)
    if state == OK:
        try:
            keys = parse_tensors(data, path, "").get("keys")
        except KeyspaceError:
            return DAMAGED
        if keys is None or not bool(torch.isfinite(keys.float()).all()):
            return DAMAGED
    return state


def _parse_json(path: Path) -> tuple[object, str | None]:
    """(document, None) or (None, why it cannot be read)."""
    try:
        return json.loads(read_regular(path)), None
    except FileSystemError as err:
        return None, f"it cannot be read ({err.cause})"
    except KeyspaceError as err:  # a link, a FIFO, a device: refused before a byte is read
        return None, f"it {err.message.removeprefix(f'{path} ').rstrip('.')}"
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        return None, f"it is not valid JSON ({err})"


def unverified_manifest(path: str | Path) -> dict | None:
    """The manifest as collect can still use it to rebuild a run: the copy in rank 0's progress
    file, else a manifest that parses but fails its checksum. None when neither exists."""
    progress, _ = _parse_json(progress_path(path, 0))
    candidates = [progress.get("manifest") if isinstance(progress, dict) else None]
    candidates.append(_parse_json(Path(path) / MANIFEST)[0])
    for doc in candidates:
        if not isinstance(doc, dict):
            continue
        rebuilt = {**doc, "shards": [], "moments": None, "state": STATE_PARTIAL}
        try:
            Manifest.from_json(rebuilt, Path(path) / MANIFEST)
        except KeyspaceError:
            continue
        return rebuilt
    return None


def _rebuild_hint(path: Path) -> str:
    copy = unverified_manifest(path)
    if copy is not None:
        return f"Rebuild it with `{resume_command(copy, path)}`."
    return f"Nothing survives to rebuild it from: `{shell_command('rm', '-r', path)}` and collect again."


class RunFolder:
    """Read access to a run folder. Stages after collect use only this; every read is verified,
    then parsed and checked (docs/run-format.md, "What is checked at each read")."""

    def __init__(self, path: str | Path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self._moments: dict[str, Moments] | None = None

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise KeyspaceError(
                f"run folder {path} {'is a file' if path.exists() else 'does not exist'}.",
                "Point at a folder written by `keyspace collect --out ...`.",
            )
        if not manifest_path.exists():
            if progress_path(path, 0).is_file():
                raise KeyspaceError(f"{manifest_path} is missing.", _rebuild_hint(path))
            raise KeyspaceError(
                f"{path} is not a keyspace run (no {MANIFEST}).",
                "Point at a folder written by `keyspace collect`.",
            )
        doc, problem = _parse_json(manifest_path)
        problem = problem or seal_problem(doc)
        if problem:
            raise KeyspaceError(f"{manifest_path} is damaged: {problem}.", _rebuild_hint(path))
        try:
            return cls(path, Manifest.from_json(doc, manifest_path))
        except KeyspaceError as err:
            err.hint = _rebuild_hint(path)
            raise

    @property
    def is_complete(self) -> bool:
        return self.manifest.is_complete

    @property
    def resume_command(self) -> str:
        return resume_command(self.manifest, self.path)

    @property
    def repair_hint(self) -> str:
        return f"`{self.resume_command}` re-verifies the run and recomputes what is missing or damaged."

    def require_complete(self) -> RunFolder:
        if not self.is_complete:
            raise KeyspaceError(
                f"run {self.path} is partial (state={self.manifest.state!r}).",
                f"Finish it with `{self.resume_command}`.",
            )
        return self

    @property
    def model_identity(self) -> str:
        return self.manifest.model_identity

    @property
    def window(self) -> int:
        """Tokens per collect window: the longest position the calibration has seen."""
        return self.manifest.window

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        return self.manifest.shape

    @property
    def moments_sha256(self) -> str | None:
        """The sha256 collect recorded for the merged moments (None on a partial run)."""
        return self.manifest.moments_sha256

    def moments(self, kind: str) -> Moments:
        """One kind's merged moments, read once per RunFolder, verified against the manifest,
        shape and finiteness checked."""
        if self._moments is None:
            path, hint = self.path / MOMENTS, self.repair_hint
            data = read_verified(path, self.moments_sha256, hint)
            self._moments = moments_from_bytes(data, path, hint, self.shape)
        return self._moments[kind]

    def query_moments(self, kind: str) -> Moments | None:
        """The merged moments of `kind`'s queries (pooled per KV head); None when the run was
        collected without queries."""
        self.moments(kind)
        return self._moments.get(query_kind(kind))

    def shards(self, kind: str, layer: int) -> list[ShardRecord]:
        return [s for s in self.manifest.shards if s.kind == kind and s.layer == layer]

    @property
    def has_kept_keys(self) -> bool:
        return any(s.tokens > 0 for s in self.manifest.shards)

    def kept_keys(self, kind: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept keys of one layer: (keys (N, kv_heads, head_dim), positions (N,), windows (N,))."""
        shards = self.shards(kind, layer)
        if not shards or not self.has_kept_keys:
            raise KeyspaceError(
                f"run {self.path} kept no {kind} keys for layer {layer}.",
                "Collect with `--keep-keys all` or `--keep-keys N` to keep a sample.",
            )
        parts = [self.read_shard(s) for s in sorted(shards, key=lambda s: s.index)]
        return tuple(
            torch.cat([p[name] for p in parts]) for name in ("keys", "positions", "windows")
        )

    def read_shard(self, shard: ShardRecord) -> dict[str, torch.Tensor]:
        """One shard's tensors, verified by sha256, then shape and finiteness checked."""
        path = self.path / shard.path
        hint = self.repair_hint
        tensors = parse_tensors(read_verified(path, shard.sha256, hint), path, hint)
        keys, positions, windows = (tensors.get(n) for n in ("keys", "positions", "windows"))
        n = shard.tokens
        if (
            keys is None
            or tuple(keys.shape) != (n, *self.shape[1:])
            or positions is None
            or windows is None
            or tuple(positions.shape) != (n,)
            or tuple(windows.shape) != (n,)
        ):
            raise KeyspaceError(
                f"{path} does not hold {n} keys of shape {self.shape[1:]} with positions and windows.",
                hint,
            )
        bad = ~torch.isfinite(keys.float()).flatten(2).all(dim=-1).all(dim=0)  # (kv_heads,)
        if bad.any():
            head = int(bad.nonzero()[0, 0])
            raise KeyspaceError(
                f"{path} holds a NaN or Inf in the {shard.kind} keys of layer {shard.layer},"
                f" KV head {head}.",
                hint,
            )
        return tensors
