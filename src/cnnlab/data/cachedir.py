"""The decoded cache's folder, kept in order: one process builds an entry while the others wait, finished entries
appear by one rename, and the half-built entries of dead processes and damaged entries are removed.

Nothing here knows what an entry holds (cache.py): only folders, locks, hosts and process ids.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path

from cnnlab import files

log = logging.getLogger("cnnlab.data.cache")


def one_builder(folder: Path):
    """Hold `.<key>.lock` beside the entry while building it (files.exclusive: flock, released by the kernel if
    the process dies). flock is per machine on NFS only where its lock daemon runs; the entries' names carry
    the host name besides, so machines sharing a cache folder never judge each other's half-built entries."""
    with contextlib.suppress(OSError):
        folder.parent.mkdir(parents=True, exist_ok=True)
    return files.exclusive(folder.parent / f".{folder.name}.lock",
                           lambda: log.info("another process is decoding the same data: waiting for it"))


def building_prefix() -> str:
    """`.building-<host>-<pid>-`: a half-built entry's name says whose it is."""
    return f".building-{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def clear_abandoned(parent: Path) -> None:
    """Remove the half-built entries of this machine's processes that no longer run (killed while decoding);
    another machine's (a shared cache folder) are that machine's to judge."""
    host = socket.gethostname().replace("-", "_")
    for folder in parent.glob(".building-*"):
        parts = folder.name.split("-")
        if len(parts) < 4 or parts[1] != host:
            continue  # another machine's, or from before entries carried a host name
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
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
