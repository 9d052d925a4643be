"""Atomic file and folder writes: weights, checkpoints, caches, manifests and exports all go through these.

A write goes to a temporary name next to its destination (".NAME.tmp-XXXX", hidden, so readers that list a
folder skip it), is fsynced, then renamed into place (os.replace is atomic on POSIX and Windows within one
file system) and the parent directory is fsynced, so a crash at any point leaves either the previous file or
the new one, never a torn mixture.

    with atomic_write(path) as tmp: ...write tmp...      a file (any writer that takes a path)
    write_bytes(path, data) / write_text(path, text)     the common cases of atomic_write
    with atomic_dir(path) as tmp: ...fill tmp...         a folder, swapped into place (replacing `path`)

Modes: the temporaries start private (mkstemp 0600, mkdtemp 0700; safetensors' own writer also creates 0600
files); renamed into place they would stay so, unlike files written with open() beside them (cache shards were
0600 next to a 0644 manifest). `make_public` gives them the mode open() / mkdir() would have: 0666 / 0777
minus the umask.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

__all__ = ["atomic_dir", "atomic_write", "fsync_dir", "make_public", "write_bytes", "write_text"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it; keep other threads from seeing the 0
        mask = os.umask(0)
        os.umask(mask)
    return mask


def make_public(path: str | os.PathLike) -> None:
    """chmod `path` (a file or a directory) to the default mode of a new file / directory."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def fsync_dir(d: str | os.PathLike) -> None:
    """fsync a directory (makes a rename inside it durable)."""
    with contextlib.suppress(OSError):  # not every file system lets one fsync a directory
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success fsync it and rename it to `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(Path(tmp))
        make_public(tmp)
        os.replace(tmp, p)
        fsync_dir(p.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True):
    """Yield a temporary folder next to `path`; on success its files are fsynced and it takes `path`'s place.

    replace=True: an existing `path` is swapped out and deleted (kept intact when the write fails);
    replace=False: an existing `path` is an error (FileExistsError), e.g. a checkpoint never overwrites one.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.tmp-", dir=p.parent))
    make_public(tmp)
    old = None
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)
        if p.exists():
            if not replace:
                raise FileExistsError(f"{p} exists")
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.old-", dir=p.parent))
            os.replace(p, old / p.name)
        os.replace(tmp, p)
        fsync_dir(p.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
