"""The file system's one error boundary, and the checks that make a file trustworthy.

Every write goes through `atomic_path` (a temp file beside the target, fsync, rename), which
turns an `OSError` or safetensors' `SafetensorError` into a `FileSystemError` naming the path and
the cause. Every read of a recorded file goes through `read_verified`, which hashes the same
bytes the caller then parses. JSON files that record other files' hashes carry a checksum of
their own content (`sealed` / `seal_problem`). No run-folder names here: `keyspace.runfolder.store` owns
them and re-exports what stages need.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from keyspace.errors import FileSystemError, KeyspaceError, is_fs_error

if TYPE_CHECKING:
    import torch

# The states `verify` gives a file.
OK, MISSING, DAMAGED = "ok", "missing", "damaged"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the body succeeds.

    Any OSError or SafetensorError, in the body or in the rename, becomes a `FileSystemError`
    naming `path` and the cause. The file gets the usual permissions (0666 less the umask).
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes the file 0600; a run file gets what any other file would
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except Exception as err:
        if is_fs_error(err):
            raise FileSystemError(path, err) from None
        raise
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Write `data` atomically; returns its sha256, computed from memory (no second read)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: str | Path, data: dict) -> str:
    return write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


# JSON run files (manifest, progress, ranks) carry a checksum of their own content: the sha256 of
# their canonical JSON without this field. Python floats round-trip through JSON exactly.
CHECKSUM_FIELD = "content_sha256"


def content_checksum(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def sealed(doc: dict) -> dict:
    """`doc` with its content checksum."""
    return {**doc, CHECKSUM_FIELD: content_checksum(doc)}


def seal_problem(doc: object) -> str | None:
    """Why a parsed JSON document cannot be trusted, or None."""
    if not isinstance(doc, dict):
        return "it is not a JSON object"
    if not isinstance(doc.get(CHECKSUM_FIELD), str):
        return "it has no checksum (written by an older keyspace, or by hand)"
    if content_checksum(doc) != doc[CHECKSUM_FIELD]:
        return "its content does not match its checksum (edited, or damaged)"
    return None


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> str:
    """A safetensors file, written atomically; returns its sha256."""
    from safetensors.torch import save

    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    return write_bytes_atomic(path, save(contiguous, metadata=metadata))


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before any work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".keyspace-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise FileSystemError(folder, err, "write to") from None
    return folder


# ---- reading: verify, then parse -------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_state(path: Path, sha256: str | None) -> str:
    """OK, MISSING or DAMAGED (unreadable, or its sha256 is not `sha256`), streaming the file."""
    if not path.is_file():
        return MISSING
    try:
        return OK if sha256_file(path) == sha256 else DAMAGED
    except OSError:
        return DAMAGED


def read_file(path: Path, hint: str) -> bytes:
    """The bytes of a run file; a missing or unreadable file is an error naming it."""
    if not path.exists():
        raise KeyspaceError(f"{path} is missing.", hint)
    try:
        return path.read_bytes()
    except OSError as err:
        raise FileSystemError(path, err, "read") from None


def read_verified(path: Path, sha256: str | None, hint: str) -> bytes:
    """The bytes of a run file, after checking them against the sha256 the run recorded.

    One read: the hash is computed from the same bytes the caller then parses.
    """
    data = read_file(path, hint)
    if not isinstance(sha256, str):
        raise KeyspaceError(f"{path} has no sha256 on record, so it cannot be trusted.", hint)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise KeyspaceError(
            f"{path} is damaged: its sha256 does not match the one recorded when it was written.",
            hint,
        )
    return data


def parse_tensors(data: bytes, path: Path, hint: str) -> dict[str, torch.Tensor]:
    """safetensors bytes -> tensors; a parse failure names the file."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as err:  # SafetensorError, or a header of the wrong shape
        raise KeyspaceError(f"{path} is not a readable safetensors file ({err}).", hint) from None
