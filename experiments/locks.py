"""One writer per directory: the lock every nnx process holds on the directory it writes.

A check that a directory is free followed by writing into it lets two runs
started together both pass the check; holding an exclusive lock on the
directory from the check to the last file does not. The lock is ``flock`` on
the directory itself, so there is no lock file to clean up, and the kernel
releases it when the process ends, however it ends (a killed run never leaves
its directory locked).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from experiments.errors import BusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, one writer per directory by convention
    fcntl = None


@contextlib.contextmanager
def directory_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the existing directory ``folder`` while the block runs;
    BusyError when another process (or another block in this one) holds it."""
    folder = Path(folder)
    if fcntl is None:
        yield folder
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"another nnx process is writing to {folder}; wait for it to finish "
                            "or choose another directory") from None
        yield folder
    finally:
        os.close(fd)
