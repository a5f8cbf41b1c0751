"""One writer per run directory: the training process (rank 0) holds the directory lock of sagan.utils.directory_lock
on its run directory for the life of its run. A second trainer on the same directory stops before any work, naming
the holder; a lock left by a killed process never blocks the next start; a filesystem without file locks (some NFS
mounts) is reported, not ignored."""

from __future__ import annotations

import os
from pathlib import Path

from sagan.utils.directory_lock import DirectoryBusy, LocksUnsupported, describe, lock_directory
from sagan.utils.errors import UserError

_held: dict[Path, "RunLock"] = {}  # the locks this process holds, by run directory


class RunLocked(UserError, OSError):
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
    try:
        fd = lock_directory(run_dir)
    except DirectoryBusy as e:
        raise RunLocked(
            f"run directory {run_dir} is in use by {describe(e.holder)}: two trainers must not write one run; "
            "wait for it to end (or stop it), or train into another hydra.run.dir"
        ) from None
    except LocksUnsupported as e:
        raise RunLocked(
            f"cannot lock run directory {run_dir} ({e.strerror}): its filesystem has no file locks, so a "
            "second trainer on it would not be stopped; set train.lock=false to train without the lock"
        ) from None
    _held[run_dir] = lock = RunLock(run_dir, fd)
    return lock
