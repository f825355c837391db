"""The decoded cache's folder, kept in order: one process builds an entry while the others wait, finished entries
appear by one rename, and the half-built entries of dead processes and damaged entries are removed.

Nothing here knows what an entry holds (cache.py): only folders, locks and process ids.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("cnnlab.data.cache")


@contextlib.contextmanager
def one_builder(folder: Path):
    """Hold `.<key>.lock` beside the entry while building it (flock: released by the kernel if the process dies).
    Without a writable cache folder there is nothing to share, and no lock."""
    lock = folder.parent / f".{folder.name}.lock"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is decoding the same data: waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # removed while held: a process still waiting on it looks for the finished entry before building, and
        # one arriving later makes a new lock; the cache folder keeps only entries
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def clear_abandoned(parent: Path) -> None:
    """Remove the half-built entries of processes that no longer run (killed while decoding)."""
    for folder in parent.glob(".building-*"):
        try:
            os.kill(int(folder.name.split("-")[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue  # not ours to judge, or its process is alive


def discard(folder: Path) -> None:
    """Move a damaged entry out of the way (one rename, so no reader sees it half-deleted), then delete it."""
    gone = folder.with_name(f".damaged-{os.getpid()}-{folder.name}")
    try:
        os.replace(folder, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def publish(tmp: Path, folder: Path) -> Path:
    """Rename the finished entry into place; if another process finished the same entry first, keep theirs."""
    if not folder.exists():
        try:
            os.replace(tmp, folder)
        except OSError:
            pass  # another process renamed its copy into place between the look and the rename
    return folder


def remove_when_mapped(tmp: Path) -> None:
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
