"""Durable, atomic file writes: the one implementation (design invariant 5, nothing lost).

Every file the project writes (checkpoints and their ``latest`` pointer,
dataset files, manifests, cached downloads, run files) goes through here: the
data are written to a temporary file ``.<name>.<random>.tmp`` in the target's
folder, the file is fsynced, ``os.replace``-d onto the target and the folder
is fsynced.  A reader therefore sees the old file or the complete new one,
never a partial one, even after a crash or power loss; an error before the
replace leaves the target untouched and removes the temporary file.

* :func:`atomic_open` - a file object to write to (text or binary);
* :func:`atomic_write_text`, :func:`atomic_write_bytes` - a whole file at once;
* :func:`atomic_path` - a temporary *name* for libraries that write by file
  name (h5py);
* :func:`temp_path` and :func:`commit` - the two halves, for writers that keep
  their temporary file open for a long time (``DatasetWriter``).

Files are created with mode ``0666 & ~umask``, like :func:`open` does.  A
temporary left behind by a killed process is recognised by
:func:`is_temp_name` (``checkpoint.cleanup_temporaries`` removes them).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from os import PathLike
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TEMP_SUFFIX",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit",
    "fsync_path",
    "is_temp_name",
    "temp_path",
    "write_all",
]

#: Suffix of every temporary file name made by :func:`temp_path`.
TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"\..+" + re.escape(TEMP_SUFFIX), re.DOTALL)
#: Attempts to find a free temporary name (a clash of 48 random bits is already unlikely).
_ATTEMPTS = 100


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_path(path: str | PathLike[str], *, directory: bool = False) -> None:
    """Fsync a file (or directory) by path, so a rename after it is durable."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories; nothing more to do
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def temp_path(path: str | PathLike[str]) -> Path:
    """A fresh unique temporary name ``.<name>.<random>.tmp`` beside ``path``.

    Same folder, so ``os.replace`` onto ``path`` is atomic.  Only a name: no
    file is created.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """True for a name of the form ``.<anything>.tmp``, as :func:`temp_path` makes them."""
    return _TEMP_RE.fullmatch(name) is not None


def _discard(tmp: Path) -> None:
    """Remove a temporary file; never raises (it runs while another error propagates)."""
    with suppress(OSError):
        os.unlink(tmp)


def _replace(tmp: str | PathLike[str], path: str | PathLike[str]) -> None:
    """``os.replace`` the (already fsynced) ``tmp`` onto ``path``, then fsync the folder."""
    os.replace(tmp, path)
    fsync_path(Path(path).parent, directory=True)


def commit(tmp: str | PathLike[str], path: str | PathLike[str]) -> None:
    """Fsync ``tmp``, ``os.replace`` it onto ``path``, fsync the folder.

    The last step of every atomic write, for writers that keep their own
    temporary file (from :func:`temp_path`, closed by now) for a long time,
    like ``DatasetWriter``.  On an error ``tmp`` is left for the caller to
    remove and ``path`` is untouched.
    """
    fsync_path(tmp)
    _replace(tmp, path)


@contextmanager
def atomic_path(path: str | PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a library that writes by file name (h5py).

    On normal exit the temporary file (which the body must have created and
    closed) is fsynced, ``os.replace``-d onto ``path`` and the folder fsynced;
    on an exception the temporary is removed and the exception re-raised (the
    old ``path``, if any, is untouched).
    """
    tmp = temp_path(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def _create_temp(path: Path) -> tuple[Path, int]:
    """Create a new temporary file beside ``path`` (mode 0666 & ~umask); its path and fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        tmp = temp_path(path)
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path} after {_ATTEMPTS} attempts")


@contextmanager
def atomic_open(path: str | PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Like ``open(path, mode)`` for writing (``'w'`` or ``'wb'`` only), but atomic and durable.

    The data go to a temporary file beside ``path``; on normal exit it is
    flushed, fsynced, closed, ``os.replace``-d onto ``path`` and the folder
    fsynced.  On an exception the temporary is removed and nothing changes at
    ``path``.  ``kwargs`` go to :func:`open` (``encoding``, ``newline``,
    ``buffering``...).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp, fd = _create_temp(path)
    try:
        f = os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        _discard(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def atomic_write_text(path: str | PathLike[str], text: str) -> None:
    """Make ``path`` hold ``text`` in UTF-8, atomically and durably (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str | PathLike[str], data: bytes) -> None:
    """Make ``path`` hold ``data``, atomically and durably (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data)
