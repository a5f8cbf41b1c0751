"""Files written so that a crash at any moment leaves either the old file or the new one, whole; and a full disk
reported as one line naming the file and the space it needed, never as a half-written file."""

from __future__ import annotations

import errno
import io
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from sagan.utils.errors import UserError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(UserError, OSError):
    """A write that failed for lack of space (or quota); the message names the file, what it needed, what was free,
    and what to do next (`then`)."""

    def __init__(self, path: Path, needed: int, free: int, code: int, then: str = "free some space and run again") -> None:
        super().__init__(
            f"no space left on the device writing {path}: it needs {_size(needed)}, {_size(free)} are free "
            f"({os.strerror(code).lower()}); {then}"
        )
        self.errno, self.path, self.needed, self.free = code, path, needed, free

    def then(self, what: str) -> DiskFull:
        """The same error with another next step."""
        return DiskFull(self.path, self.needed, self.free, self.errno, what)


@contextmanager
def space_for(path: Path, needed: int) -> Iterator[None]:
    """Report a write of `needed` bytes to `path` that runs out of space inside the block as DiskFull."""
    try:
        yield
    except DiskFull:
        raise
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        raise DiskFull(path, needed, free, e.errno) from None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the same directory, fsync'ed and renamed over
    `path` when the block ends without an error (os.replace is atomic within a filesystem), then the directory entry
    fsync'ed. On an error the temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically (see `atomic_file`); a full disk raises DiskFull and leaves
    `path` as it was."""
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    with space_for(path, len(data)), atomic_file(path) as f:
        f.write(data)


def write_png(path: Path, image: Image.Image) -> None:
    """A PIL image as a PNG file, written atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
