"""The run folder: the contract between collect and every later stage.

This module is the only one that knows the folder's file names; every other module asks it.

Layout (documented in docs/run-format.md):
  manifest.json                              identity, shapes, shards with sha256, state
  moments.safetensors                        float64 running moments per kind (merged over ranks)
  keys/{kind}/layer{LL}/r{R}-{CCCCC}.safetensors   kept keys: `keys` (tokens, kv_heads, head_dim),
                                             `positions` (tokens,) int64, `windows` (tokens,) int64
  progress/rank{R}.json, progress/moments.rank{R}.c{CCCCC}.safetensors   collect's commit points
  ranks.json, calibration.safetensors        written by analyze
  validate/                                  validate's default output folder
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError

KINDS = ("pre", "post")
MANIFEST = "manifest.json"
MOMENTS = "moments.safetensors"
KEYS_DIR = "keys"
PROGRESS_DIR = "progress"
RANKS = "ranks.json"
CALIBRATION = "calibration.safetensors"
VALIDATE_DIR = "validate"
# The explained-variance threshold analyze always writes and `--d auto` / recall read by default.
DEFAULT_THRESHOLD = 0.9
STATE_PARTIAL = "partial"
STATE_COMPLETE = "complete"


def shard_name(kind: str, layer: int, rank: int, chunk: int) -> str:
    """A key shard's path relative to the run folder."""
    return f"{KEYS_DIR}/{kind}/layer{layer:02d}/r{rank}-{chunk:05d}.safetensors"


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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the body succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Moments:
    """Running first and second moments of keys, exact in float64 and mergeable by summation.

    count: (layers,)                              tokens seen per layer
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
        layers, heads, dim = self.sum.shape
        if self.count.shape != (layers,) or self.outer.shape != (layers, heads, dim, dim):
            raise ValueError("Moments shapes disagree")

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


def save_moments(path: str | Path, moments: dict[str, Moments]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for kind, m in moments.items():
        tensors.update({k: v.contiguous() for k, v in m.to_tensors(kind).items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_moments(path: str | Path) -> dict[str, Moments]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    kinds = sorted({name.split(".", 1)[0] for name in tensors})
    return {kind: Moments.from_tensors(tensors, kind) for kind in kinds}


class RunFolder:
    """Read access to a run folder. Stages after collect use only this."""

    def __init__(self, path: str | Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise KeyspaceError(
                f"run folder {path} does not exist.",
                "Create one with `keyspace collect --out ...`.",
            )
        if not manifest_path.is_file():
            raise KeyspaceError(
                f"{path} is not a keyspace run (no {MANIFEST}).",
                "Point at a folder written by `keyspace collect`.",
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise KeyspaceError(
                f"{manifest_path} is not valid JSON ({err}).", "Re-run `keyspace collect --resume`."
            ) from None
        return cls(path, manifest)

    @property
    def is_complete(self) -> bool:
        return self.manifest.get("state") == STATE_COMPLETE

    def require_complete(self) -> RunFolder:
        if not self.is_complete:
            raise KeyspaceError(
                f"run {self.path} is partial (state={self.manifest.get('state')!r}).",
                f"Finish it with `keyspace collect --resume --out {self.path} ...` with the same arguments.",
            )
        return self

    @property
    def model_identity(self) -> str:
        return self.manifest["model"]["identity"]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim)."""
        m = self.manifest
        return m["num_layers"], m["num_kv_heads"], m["head_dim"]

    def moments(self, kind: str) -> Moments:
        path = self.path / MOMENTS
        if not path.is_file():
            raise KeyspaceError(
                f"run {self.path} has no {MOMENTS}.", "Re-run `keyspace collect --resume`."
            )
        return load_moments(path)[kind]

    def shards(self, kind: str, layer: int) -> list[dict]:
        return [
            s for s in self.manifest.get("shards", []) if s["kind"] == kind and s["layer"] == layer
        ]

    @property
    def has_kept_keys(self) -> bool:
        return any(s["tokens"] > 0 for s in self.manifest.get("shards", []))

    def kept_keys(self, kind: str, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept keys of one layer: (keys (N, kv_heads, head_dim), positions (N,), windows (N,))."""
        from safetensors.torch import load_file

        shards = self.shards(kind, layer)
        if not shards or not self.has_kept_keys:
            raise KeyspaceError(
                f"run {self.path} kept no {kind} keys for layer {layer}.",
                "Collect with `--keep-keys all` or `--keep-keys N` to keep a sample.",
            )
        parts = [
            load_file(str(self.path / s["path"])) for s in sorted(shards, key=lambda s: s["index"])
        ]
        return tuple(
            torch.cat([p[name] for p in parts]) for name in ("keys", "positions", "windows")
        )
