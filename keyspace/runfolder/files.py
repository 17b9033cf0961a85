"""The file system's one error boundary, and the checks that make a file trustworthy.

Writes never follow a link out of a folder. Every write goes through `write_bytes_atomic`: a temp
file with an unpredictable name beside the target (`tempfile.mkstemp`, created `O_EXCL`), written
through its descriptor, fsynced, then renamed onto the target. A symbolic link at the target, or
at a folder keyspace creates below a `root` the caller names, is refused. An `OSError` or
safetensors' `SafetensorError` becomes a `FileSystemError` naming the path and the cause, and
nothing partial is left under the final name.

Every read of a run file goes through `read_file` (`read_verified` adds the sha256 check): the file
is opened `O_NOFOLLOW | O_NONBLOCK` and must be a regular file by `fstat` of that descriptor, so a
FIFO, a device or a link is refused before a byte is read. JSON files that record other files'
hashes carry a checksum of their own content (`sealed` / `seal_problem`): it detects damage, not
tampering. No run-folder names here: `keyspace.runfolder.store` owns them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from keyspace.errors import FileSystemError, KeyspaceError, is_fs_error, shell_command

if TYPE_CHECKING:
    import torch

# The states `verify` gives a file.
OK, MISSING, DAMAGED = "ok", "missing", "damaged"


def link_error(path: Path, hint: str = "") -> KeyspaceError:
    """A symbolic link where keyspace reads or writes a file of its own."""
    return KeyspaceError(
        f"{path} is a symbolic link; keyspace never reads or writes its files through a link.",
        hint or f"Remove the link (`{shell_command('rm', path)}`), then run the command again.",
    )


def refuse_link(path: str | Path) -> None:
    """Raise `link_error` when `path` itself is a symbolic link (a dangling one too)."""
    if os.path.islink(path):
        raise link_error(Path(path))


def make_folder(folder: str | Path, root: str | Path | None = None) -> Path:
    """Create `folder` (and its parents) as real folders.

    Below `root` (the folder the user named, which may itself be reached through a link), no part
    of the path may be a symbolic link: a link planted inside a run or report folder would send
    keyspace's writes outside it.
    """
    folder = Path(folder)
    if root is None:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        refuse_link(current)
        with contextlib.suppress(FileExistsError):
            current.mkdir()
        if not current.is_dir():
            raise FileSystemError(current, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    return folder


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_bytes_atomic(path: str | Path, data: bytes, root: str | Path | None = None) -> str:
    """Write `data` to `path` atomically; returns its sha256, computed from memory.

    The final name must not be a symbolic link; with `root`, neither may any folder between
    `root` and `path`. On any failure nothing is left under the final name or a temp name.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        refuse_link(path)
        make_folder(path.parent, root)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # mkstemp makes the file 0600; a run file gets what any other file would
            os.fchmod(fd, 0o666 & ~_umask())
            os.fsync(fd)
        os.replace(tmp, path)  # a rename replaces a link planted since; it never follows one
        tmp = None
    except Exception as err:
        if is_fs_error(err):
            raise FileSystemError(path, err) from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return hashlib.sha256(data).hexdigest()


def write_text_atomic(path: str | Path, text: str, root: str | Path | None = None) -> Path:
    """A UTF-8 text file (a report page), written as `write_bytes_atomic` does."""
    write_bytes_atomic(path, text.encode("utf-8"), root)
    return Path(path)


def finite_json(value: object) -> object:
    """`value` with every NaN and ±Infinity float as None: JSON has no NaN, and Python's json
    would write a bare `NaN` that other readers refuse. Tuples become lists, as json makes them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def dumps_json(data: object, **kwargs) -> str:
    """Strict JSON text: non-finite floats written as null (`finite_json`), never bare."""
    return json.dumps(finite_json(data), allow_nan=False, **kwargs)


def write_json_atomic(path: str | Path, data: dict, root: str | Path | None = None) -> str:
    return write_bytes_atomic(path, (dumps_json(data, indent=2) + "\n").encode(), root)


# JSON run files (manifest, progress, ranks) carry a checksum of their own content: the sha256 of
# their canonical JSON without this field. Python floats round-trip through JSON exactly; a NaN
# or Infinity is written as null, so it is null in the canonical form too.
CHECKSUM_FIELD = "content_sha256"


def content_checksum(doc: dict, legacy: bool = False) -> str:
    """legacy: the form of keyspace before null, a bare NaN or Infinity in the canonical JSON."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_FIELD}
    dumps = json.dumps if legacy else dumps_json
    canonical = dumps(body, sort_keys=True, separators=(",", ":"))
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
    if doc[CHECKSUM_FIELD] not in (content_checksum(doc), content_checksum(doc, legacy=True)):
        return "its content does not match its checksum (edited, or damaged)"
    return None


def save_tensors(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict | None = None,
    root: str | Path | None = None,
) -> str:
    """A safetensors file, written atomically; returns its sha256."""
    from safetensors.torch import save

    contiguous = {name: t.contiguous() for name, t in tensors.items()}
    return write_bytes_atomic(path, save(contiguous, metadata=metadata), root)


def check_writable(folder: str | Path, root: str | Path | None = None) -> Path:
    """Create `folder` if needed and prove a file can be written in it, before any work starts.

    With `root`, no folder between `root` and `folder` may be a symbolic link (`make_folder`).
    """
    folder = Path(folder)
    try:
        make_folder(folder, root)
        fd, probe = tempfile.mkstemp(prefix=".keyspace-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise FileSystemError(folder, err, "write to") from None
    return folder


def refuse_links_within(folder: str | Path) -> None:
    """Refuse a symbolic link anywhere inside `folder` (a run folder holds none of its own).

    keyspace writes into the folders it keeps there (progress/, keys/...); a link planted in one,
    or at a file's name, would send a write outside the folder.
    """
    for parent, folders, files in os.walk(folder):
        for name in sorted(folders + files):
            refuse_link(Path(parent, name))


# ---- reading: verify, then parse -------------------------------------------------------------


KIND_NAMES = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_regular(path: str | Path, hint: str = "", follow_links: bool = False) -> int:
    """A read-only descriptor of `path`, which must be a regular file.

    Opened `O_NONBLOCK` (a FIFO does not wait for a writer) and, unless `follow_links`,
    `O_NOFOLLOW`; the kind of file is checked by `fstat` on that descriptor, so nothing can be
    swapped in between the check and the read. A folder, FIFO, device or link is a KeyspaceError
    naming the file; an OSError is a `FileSystemError`.
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_links:
            raise link_error(path, hint) from None
        raise FileSystemError(path, err, "read") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = KIND_NAMES.get(stat.S_IFMT(mode), "not a regular file")
        raise KeyspaceError(
            f"{path} is {kind}, not a regular file; keyspace reads only regular files.",
            hint
            or f"Replace it with the file it should be, or remove it (`{shell_command('rm', '-r', path)}`).",
        )
    return fd


def read_regular(path: str | Path, hint: str = "", follow_links: bool = False) -> bytes:
    """The bytes of a regular file (`open_regular`)."""
    fd = open_regular(path, hint, follow_links)
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as err:
        raise FileSystemError(path, err, "read") from None


def sha256_file(path: str | Path, follow_links: bool = False) -> str:
    """The sha256 of a regular file, streamed; a link (unless `follow_links`) or a special file
    is refused (`open_regular`)."""
    digest = hashlib.sha256()
    with os.fdopen(open_regular(path, follow_links=follow_links), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_state(path: Path, sha256: str | None) -> str:
    """OK, MISSING or DAMAGED (unreadable, not a regular file, or its sha256 is not `sha256`)."""
    if not os.path.lexists(path):
        return MISSING
    try:
        return OK if sha256_file(path) == sha256 else DAMAGED
    except (OSError, KeyspaceError):
        return DAMAGED


def read_file(path: Path, hint: str) -> bytes:
    """The bytes of a run file; a missing, unreadable or special file is an error naming it."""
    if not os.path.lexists(path):
        raise KeyspaceError(f"{path} is missing.", hint)
    return read_regular(path, hint)


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
