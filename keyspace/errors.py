"""Errors a user can cause. The CLI prints them as one line and exits with code 2 (130 on Ctrl-C).

`FileSystemError` is the one place where a failed read or write (an `OSError`, or safetensors'
`SafetensorError`, which carries the OS message in its text) becomes a line naming the path and
the cause. `shell_command` quotes the commands that hints and "Next:" lines print.
"""

from __future__ import annotations

import errno
import os
import shlex
from pathlib import Path

# errno -> the cause a user reads; anything else falls back to the OS's own words.
FS_CAUSES = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "it does not exist",
    errno.EIO: "an input/output error (a failing disk?)",
}
FS_HINTS = {
    errno.EROFS: "Choose a folder on a writable file system.",
    errno.ENOSPC: "Free some space, or choose a folder on another disk, then run the command again.",
    errno.EDQUOT: "Free some space, or choose a folder on another disk, then run the command again.",
    errno.EACCES: "Fix the folder's permissions, or choose another folder.",
    errno.EPERM: "Fix the folder's permissions, or choose another folder.",
    errno.ENOTDIR: "Choose a folder path; a file stands where a folder should be.",
    errno.EEXIST: "Choose a folder path; a file stands where a folder should be.",
    errno.EISDIR: "Remove the folder that stands where a file should be.",
}


class KeyspaceError(Exception):
    """A known, user-facing failure: a message plus a hint on how to fix it."""

    prefix = "Error"
    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        text = f"{self.prefix}: {self.message}"
        if self.hint:
            text += f" Hint: {self.hint}"
        return " ".join(text.split())


class Interrupted(KeyspaceError):
    """Ctrl-C: what is kept and how to go on. Exits 130, as a shell does for SIGINT."""

    prefix = "Interrupted"
    exit_code = 130


def fs_errno(err: BaseException) -> int | None:
    """The errno of an OSError, or the one named in a SafetensorError's text."""
    if isinstance(err, OSError):
        return err.errno
    text = str(err)
    return next((code for code in FS_CAUSES if os.strerror(code) in text), None)


class FileSystemError(KeyspaceError):
    """A read or write that the file system refused; `code` is the errno when one is known."""

    def __init__(self, path: str | Path, err: BaseException, action: str = "write"):
        self.path = Path(path)
        self.code = fs_errno(err)
        self.cause = cause = FS_CAUSES.get(self.code) or getattr(err, "strerror", None) or str(err)
        super().__init__(
            f"cannot {action} {self.path}: {cause}.",
            FS_HINTS.get(self.code, "Check the path and the disk, then run the command again."),
        )

    @property
    def no_space(self) -> bool:
        return self.code in (errno.ENOSPC, errno.EDQUOT)


def is_fs_error(err: BaseException) -> bool:
    """True for the exceptions `FileSystemError` wraps: OSError and safetensors' SafetensorError."""
    return isinstance(err, OSError) or type(err).__name__ == "SafetensorError"


def shell_command(*words: object) -> str:
    """A command line a user can paste: every word quoted for the shell where it needs it."""
    return " ".join(shlex.quote(str(word)) for word in words)
