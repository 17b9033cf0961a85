"""The run folder: the contract between collect and every later stage.

This module is the only one that knows the folder's file names; every other module asks it.
Every write goes through `atomic_path` and every read of a run file through `read_verified`,
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from keyspace.errors import FileSystemError, KeyspaceError, shell_command

# The boundary and the integrity checks live in keyspace.runfolder.files; stages use them from here.
from keyspace.runfolder.files import CHECKSUM_FIELD as CHECKSUM_FIELD
from keyspace.runfolder.files import DAMAGED as DAMAGED
from keyspace.runfolder.files import MISSING as MISSING
from keyspace.runfolder.files import OK as OK
from keyspace.runfolder.files import atomic_path as atomic_path
from keyspace.runfolder.files import check_writable as check_writable
from keyspace.runfolder.files import content_checksum as content_checksum
from keyspace.runfolder.files import file_state as file_state
from keyspace.runfolder.files import parse_tensors as parse_tensors
from keyspace.runfolder.files import read_file as read_file
from keyspace.runfolder.files import read_verified as read_verified
from keyspace.runfolder.files import save_tensors as save_tensors
from keyspace.runfolder.files import seal_problem as seal_problem
from keyspace.runfolder.files import sealed as sealed
from keyspace.runfolder.files import sha256_file as sha256_file
from keyspace.runfolder.files import write_bytes_atomic as write_bytes_atomic
from keyspace.runfolder.files import write_json_atomic as write_json_atomic

KINDS = ("pre", "post")
MANIFEST = "manifest.json"
MOMENTS = "moments.safetensors"
KEYS_DIR = "keys"
PROGRESS_DIR = "progress"
LOCK_PREFIX = ".lock-rank"
RANKS = "ranks.json"
CALIBRATION = "calibration.safetensors"
VALIDATE_DIR = "validate"
# The explained-variance threshold analyze always writes and `--d auto` / recall read by default.
DEFAULT_THRESHOLD = 0.9
STATE_PARTIAL = "partial"
STATE_COMPLETE = "complete"


def query_kind(kind: str) -> str:
    """The moments-file kind holding the queries of `kind` (tensors `query.{kind}.count`, ...)."""
    return f"query.{kind}"


QUERY_KINDS = tuple(query_kind(kind) for kind in KINDS)


def shard_name(kind: str, layer: int, rank: int, chunk: int) -> str:
    """A key shard's path relative to the run folder."""
    return f"{KEYS_DIR}/{kind}/layer{layer:02d}/r{rank}-{chunk:05d}.safetensors"


def lock_path(out: str | Path, rank: int) -> Path:
    """A rank's collector lock (an flock; the OS drops it when the process dies)."""
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


def write_manifest(run: str | Path, manifest: dict) -> None:
    write_json_atomic(Path(run) / MANIFEST, sealed(manifest))


@dataclass
class Moments:
    """Running first and second moments of keys, exact in float64 and mergeable by summation.

    Queries use the same record per KV head, their group's G query heads pooled: each token adds
    G vectors, so a query count is tokens × G.

    count: (layers,)                              vectors seen per layer (tokens for keys)
    sum:   (layers, kv_heads, head_dim)           sum of x
    outer: (layers, kv_heads, head_dim, head_dim) sum of x xᵀ
    """

    count: torch.Tensor
    sum: torch.Tensor
    outer: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("count", "sum", "outer"):
            if getattr(self, name).dtype != torch.float64:
                raise ValueError(f"Moments.{name} must be float64")
        if self.sum.dim() != 3:
            raise ValueError("Moments.sum must be (layers, kv_heads, head_dim)")
        layers, heads, dim = self.sum.shape
        if self.count.shape != (layers,) or self.outer.shape != (layers, heads, dim, dim):
            raise ValueError("Moments shapes disagree")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        return tuple(self.sum.shape)

    @classmethod
    def zeros(cls, layers: int, kv_heads: int, head_dim: int) -> Moments:
        f64 = torch.float64
        return cls(
            torch.zeros(layers, dtype=f64),
            torch.zeros(layers, kv_heads, head_dim, dtype=f64),
            torch.zeros(layers, kv_heads, head_dim, head_dim, dtype=f64),
        )

    def add_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Accumulate keys of shape (tokens, kv_heads, head_dim) into `layer`."""
        x = keys.detach().to("cpu", torch.float64)
        self.count[layer] += x.shape[0]
        self.sum[layer] += x.sum(dim=0)
        self.outer[layer] += torch.einsum("thi,thj->hij", x, x)

    def merge(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.sum + other.sum, self.outer + other.outer)

    def to_tensors(self, kind: str) -> dict[str, torch.Tensor]:
        return {f"{kind}.count": self.count, f"{kind}.sum": self.sum, f"{kind}.outer": self.outer}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kind: str) -> Moments:
        return cls(tensors[f"{kind}.count"], tensors[f"{kind}.sum"], tensors[f"{kind}.outer"])


def save_moments(path: str | Path, moments: dict[str, Moments]) -> str:
    """Write the moments of every kind; returns the file's sha256."""
    tensors: dict[str, torch.Tensor] = {}
    for kind, m in moments.items():
        tensors.update(m.to_tensors(kind))
    return save_tensors(path, tensors)


def moments_from_bytes(
    data: bytes, path: Path, hint: str, shape: tuple[int, int, int] | None = None
) -> dict[str, Moments]:
    """Parse a moments file already read (and verified); check it holds both kinds of `shape`.

    Query moments (QUERY_KINDS) are included when the file has them (runs collected with
    `--capture keys,queries`); older runs have none.
    """
    tensors = parse_tensors(data, path, hint)
    present = [q for q in QUERY_KINDS if any(name.startswith(f"{q}.") for name in tensors)]
    try:
        moments = {kind: Moments.from_tensors(tensors, kind) for kind in (*KINDS, *present)}
    except (KeyError, ValueError) as err:
        raise KeyspaceError(
            f"{path} does not hold the moments of both kinds ({err}).", hint
        ) from None
    if shape is not None and any(m.shape != tuple(shape) for m in moments.values()):
        raise KeyspaceError(f"{path} holds moments of another shape than the run's {shape}.", hint)
    return moments


def load_moments(path: str | Path, hint: str = "") -> dict[str, Moments]:
    """Moments of both kinds from a file, unverified (stages read them through RunFolder)."""
    return moments_from_bytes(read_file(Path(path), hint), Path(path), hint)


# ---- the manifest ----------------------------------------------------------------------------


def resume_command(manifest: dict, run: str | Path) -> str:
    """The `keyspace collect --resume` command that continues or repairs the run `manifest` describes."""
    model, dataset = manifest.get("model") or {}, manifest.get("dataset") or {}
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
    for flag, value in flags:
        if value is not None and not isinstance(value, (dict, list)):
            words += [flag, value]
    return shell_command(*words)


def run_capture(manifest: dict) -> tuple[str, ...]:
    """What a run captured; runs written before queries existed captured keys only."""
    capture = manifest.get("capture")
    if isinstance(capture, list) and all(isinstance(c, str) for c in capture):
        return tuple(capture)
    return ("keys",)


def _manifest_problem(m: object) -> str | None:
    """What makes a parsed manifest unusable, or None. Checks every field later stages read."""
    if not isinstance(m, dict):
        return "it is not a JSON object"

    def is_int(v: object, low: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if m.get("state") not in (STATE_PARTIAL, STATE_COMPLETE):
        return f"state is {m.get('state')!r}"
    if not isinstance(m.get("model"), dict) or not isinstance(m["model"].get("identity"), str):
        return "model.identity is missing"
    for key in ("num_layers", "num_kv_heads", "head_dim", "window"):
        if not is_int(m.get(key), 1):
            return f"{key} is {m.get(key)!r}, not a positive integer"
    if not is_int(m.get("tokens")) or not isinstance(m.get("shards"), list):
        return "tokens or shards is missing or of the wrong type"
    for shard in m["shards"]:
        if not isinstance(shard, dict):
            return "a shard entry is not an object"
        path = shard.get("path")
        if (
            shard.get("kind") not in KINDS
            or not (is_int(shard.get("layer")) and shard["layer"] < m["num_layers"])
            or not (is_int(shard.get("index")) and is_int(shard.get("tokens")))
            or not isinstance(shard.get("sha256"), str)
            or not isinstance(path, str)
        ):
            return f"shard entry {shard} has a missing or wrong field"
        if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            return f"shard path {path!r} leaves the run folder"
    if m["state"] == STATE_COMPLETE and (kept := _kept_per_layer(m)) is not None:
        for kind in KINDS:
            for layer in range(m["num_layers"]):
                listed = sum(
                    s["tokens"] for s in m["shards"] if (s["kind"], s["layer"]) == (kind, layer)
                )
                if listed != kept:
                    return f"its shards hold {listed} {kind} keys of layer {layer}, not the {kept} kept"
    record = m.get("moments")
    if record is not None and not (
        isinstance(record, dict)
        and record.get("path") == MOMENTS
        and isinstance(record.get("sha256"), str)
    ):
        return f"the moments record {record!r} is malformed"
    return None


def _kept_per_layer(m: dict) -> int | None:
    """Keys a complete run keeps per (kind, layer) under its --keep-keys; None when unrecorded."""
    keep = m.get("keep_keys")
    if keep == "all":
        return m["tokens"]
    if keep == "none":
        return 0
    return min(int(keep), m["tokens"]) if isinstance(keep, str) and keep.isdigit() else None


def _parse_json(path: Path) -> tuple[object, str | None]:
    """(document, None) or (None, why it cannot be read)."""
    try:
        return json.loads(path.read_bytes()), None
    except OSError as err:
        return None, f"it cannot be read ({FileSystemError(path, err, 'read').cause})"
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        return None, f"it is not valid JSON ({err})"


def unverified_manifest(path: str | Path) -> dict | None:
    """The manifest as collect can still use it to rebuild a run: the copy in rank 0's progress
    file, else a manifest that parses but fails its checksum. None when neither exists."""
    progress, _ = _parse_json(progress_path(path, 0))
    candidates = [(progress or {}).get("manifest") if isinstance(progress, dict) else None]
    candidates.append(_parse_json(Path(path) / MANIFEST)[0])
    for doc in candidates:
        if not isinstance(doc, dict):
            continue
        rebuilt = {**doc, "shards": [], "moments": None, "state": STATE_PARTIAL}
        if _manifest_problem(rebuilt) is None:
            return rebuilt
    return None


def _rebuild_hint(path: Path) -> str:
    copy = unverified_manifest(path)
    if copy is not None:
        return f"Rebuild it with `{resume_command(copy, path)}`."
    return f"Nothing survives to rebuild it from: `{shell_command('rm', '-r', path)}` and collect again."


class RunFolder:
    """Read access to a run folder. Stages after collect use only this; every read is verified."""

    def __init__(self, path: str | Path, manifest: dict):
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
        manifest, problem = _parse_json(manifest_path)
        problem = problem or seal_problem(manifest) or _manifest_problem(manifest)
        if problem:
            raise KeyspaceError(f"{manifest_path} is damaged: {problem}.", _rebuild_hint(path))
        return cls(path, manifest)

    @property
    def is_complete(self) -> bool:
        return self.manifest.get("state") == STATE_COMPLETE

    @property
    def resume_command(self) -> str:
        return resume_command(self.manifest, self.path)

    @property
    def repair_hint(self) -> str:
        return f"`{self.resume_command}` re-verifies the run and recomputes what is missing or damaged."

    def require_complete(self) -> RunFolder:
        if not self.is_complete:
            raise KeyspaceError(
                f"run {self.path} is partial (state={self.manifest.get('state')!r}).",
                f"Finish it with `{self.resume_command}`.",
            )
        return self

    @property
    def model_identity(self) -> str:
        return self.manifest["model"]["identity"]

    @property
    def window(self) -> int:
        """Tokens per collect window: the longest position the calibration has seen."""
        return self.manifest["window"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        m = self.manifest
        return m["num_layers"], m["num_kv_heads"], m["head_dim"]

    @property
    def moments_sha256(self) -> str | None:
        """The sha256 collect recorded for the merged moments (None on a partial run)."""
        return (self.manifest.get("moments") or {}).get("sha256")

    def moments(self, kind: str) -> Moments:
        """One kind's merged moments, read once per RunFolder and verified against the manifest."""
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

    def shards(self, kind: str, layer: int) -> list[dict]:
        return [s for s in self.manifest["shards"] if s["kind"] == kind and s["layer"] == layer]

    @property
    def has_kept_keys(self) -> bool:
        return any(s["tokens"] > 0 for s in self.manifest["shards"])

    def kept_keys(self, kind: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept keys of one layer: (keys (N, kv_heads, head_dim), positions (N,), windows (N,))."""
        shards = self.shards(kind, layer)
        if not shards or not self.has_kept_keys:
            raise KeyspaceError(
                f"run {self.path} kept no {kind} keys for layer {layer}.",
                "Collect with `--keep-keys all` or `--keep-keys N` to keep a sample.",
            )
        parts = [self._read_shard(s) for s in sorted(shards, key=lambda s: s["index"])]
        return tuple(
            torch.cat([p[name] for p in parts]) for name in ("keys", "positions", "windows")
        )

    def _read_shard(self, shard: dict) -> dict[str, torch.Tensor]:
        path = self.path / shard["path"]
        hint = self.repair_hint
        tensors = parse_tensors(read_verified(path, shard["sha256"], hint), path, hint)
        keys, positions, windows = (tensors.get(n) for n in ("keys", "positions", "windows"))
        n = shard["tokens"]
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
        return tensors
