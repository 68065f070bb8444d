"""Durable file writes: fsync by path (design invariant 5, nothing lost).

Shared by the dataset writer (``mpinewton.data.hdf5``) and the checkpoints
(``mpinewton.checkpoint``): a rename is durable only after the file and then
its folder have been fsynced.
"""

from __future__ import annotations

import os
from os import PathLike


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
