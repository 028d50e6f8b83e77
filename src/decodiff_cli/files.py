"""Atomic files: a file is either its old self or its complete new self, never a torn mix.

Runs are unattended (cron, pipelines), so every writer must survive being killed or running
out of disk half-way: write a temp file next to the target, fsync it, rename it over.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

PathLike = str | os.PathLike

# Read once: mkstemp creates files 0600, we want what a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_writer(path: PathLike, mode: str = "wb", **open_kw: Any) -> Iterator[IO]:
    """Yield a temp file next to ``path``; on clean exit fsync it and rename it over ``path``.

    The temp file lives in the same folder so ``os.replace`` is a rename within one file
    system, which is atomic. On any error (disk full, a bug in the writer, Ctrl-C) the old
    file is left untouched and the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fixed short prefix, not path.name: a long input name plus a prefix could pass NAME_MAX.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".decodiff-", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself survive a power cut


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: not every file system allows it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_writer(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
