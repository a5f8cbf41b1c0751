"""One writer per run directory: an advisory lock (`fcntl.flock` on `<run dir>/.lock`) that the training process holding
it keeps for the life of its run. A second trainer on the same directory stops before any work, naming the holder.
The kernel drops the lock when its holder exits, however it exits (kill -9 included), so a lock left by a killed
process never blocks the next start. A filesystem without file locks (some NFS mounts) is reported, not ignored."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
_held: dict[Path, "RunLock"] = {}  # the locks this process holds, by run directory


class RunLocked(OSError):
    """The run directory is locked by another trainer, or cannot be locked at all; the message says which."""


class RunLock:
    """The lock of one run directory, held by this process until `release` (or its exit)."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self.fd = run_dir, fd

    def release(self) -> None:
        _held.pop(self.run_dir, None)
        os.close(self.fd)  # closing the file releases the lock; the file stays, naming the last holder


def acquire(run_dir: Path) -> RunLock:
    """Lock `run_dir` for this process (again: the lock it holds already), or raise RunLocked naming the holder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return _held[run_dir]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunLocked(
                f"run directory {run_dir} is in use by {describe(holder(path))}: two trainers must not write one run; "
                "wait for it to end (or stop it), or train into another hydra.run.dir"
            ) from None
        raise RunLocked(
            f"cannot lock run directory {run_dir} ({os.strerror(e.errno)}): its filesystem has no file locks, so a "
            "second trainer on it would not be stopped; set train.lock=false to train without the lock"
        ) from None
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[run_dir] = lock = RunLock(run_dir, fd)
    return lock


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
