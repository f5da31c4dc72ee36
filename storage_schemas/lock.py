"""The single-writer lock: an OS advisory lock, so a writer that dies cannot leave it stuck."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .schema import LOCK_FILE, ArchiveLockedError


class WriterLock:
    """Exclusive `flock` on `<archive>/.mir-writer.lock`; the kernel drops it when the holder dies."""

    def __init__(self, archive_dir: Path):
        self.path = Path(archive_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ArchiveLockedError(
                f"{self.path.parent} is being written by another process ({holder}); wait for it to "
                "finish, or stop it. The lock frees itself when that process exits.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
    except (OSError, ValueError):
        return "unknown holder"
