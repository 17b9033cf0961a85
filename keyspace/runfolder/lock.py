"""The run folder's lock: one writer at a time (collect's ranks each hold their own; analyze
holds rank 0's). Moved here from keyspace.collect.checkpoint so that analyze can take it too.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Any

from keyspace.errors import FileSystemError, KeyspaceError, shell_command
from keyspace.runfolder.files import link_error, refuse_links_within
from keyspace.runfolder.store import lock_path


class FolderLock:
    """An exclusive flock on the rank's lock file (`store.lock_path`); the OS drops it if the process dies.

    The file is opened `O_CREAT | O_WRONLY | O_NOFOLLOW` and never truncated: a link planted at
    its name is refused, not followed. Once the lock is held, a link anywhere in the run folder is
    refused too (`refuse_links_within`): collect writes into its subfolders next.
    """

    def __init__(self, out: Path, rank: int, busy: tuple[str, str] | None = None):
        self.path = lock_path(out, rank)
        self.fd: int | None = None
        # (message, hint) when another process holds the lock; collect's by default
        self.busy = busy or (
            f"another collector is writing to {self.path.parent}.",
            "Wait for it to finish, or choose another --out.",
        )

    def __enter__(self) -> FolderLock:
        self.fd = self._open()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._close()
            raise KeyspaceError(*self.busy) from None
        try:
            refuse_links_within(self.path.parent)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self) -> int:
        flags = os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise link_error(self.path) from None
            if err.errno == errno.EISDIR:
                raise KeyspaceError(
                    f"{self.path} is a folder; collect keeps its lock file at that name.",
                    f"Remove the folder (`{shell_command('rm', '-r', self.path)}`), then run the"
                    " command again.",
                ) from None
            raise FileSystemError(self.path, err) from None

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._close()
