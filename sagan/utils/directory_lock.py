"""One writing process per directory: an advisory lock (`fcntl.flock` on `<directory>/.lock`) held until the holder
closes it or exits. The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a lock
left by a killed process never blocks the next start. The lock file names its last holder (host, pid, since when)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from sagan.utils.errors import UserError

LOCK_FILE = ".lock"


class DirectoryBusy(UserError, OSError):
    """Another process holds the lock; `holder` is what it wrote ({} when it wrote nothing)."""

    def __init__(self, directory: Path, holder: dict[str, Any]) -> None:
        super().__init__(f"{directory} is locked by {describe(holder)}")
        self.holder = holder


class LocksUnsupported(UserError, OSError):
    """The directory's filesystem has no file locks (some NFS mounts), so nothing would stop a second writer."""


def lock_directory(directory: Path) -> int:
    """Take the lock of `directory` (created if missing) for this process, returning the file descriptor that holds
    it (closing it releases the lock); raise DirectoryBusy or LocksUnsupported."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DirectoryBusy(directory, holder(path)) from None
        raise LocksUnsupported(e.errno, os.strerror(e.errno)) from None
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def holder(path: Path) -> dict[str, Any]:
    """Who wrote the lock file last (the holder, while it is locked)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def describe(record: dict[str, Any]) -> str:
    if not record:
        return "another process (its lock file names no holder)"
    return f"pid {record.get('pid')} on {record.get('host')} (since {record.get('since')})"
