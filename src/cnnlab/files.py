"""Atomic file writes: a crash, Ctrl-C or SIGKILL leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnnlab.errors import CnnlabError


@contextmanager
def atomic_path(path: str | os.PathLike, backup: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    With `backup`, the file being replaced is first renamed to `backup`, so that the previous version
    survives until the new one is complete. A failed write (a full disk, say) is a CnnlabError naming
    the file, and leaves no temporary file behind.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # the rename would replace a device, FIFO or socket (or fail on a folder)
        raise CnnlabError(f"cannot write {path}: it is not a regular file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; results should read like any other file
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync_dir(folder: Path) -> None:
    """Make the renames themselves durable (a crash right after could otherwise undo them)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def require_space(folder: Path, needed: int, what: str) -> None:
    """Fail before a long job starts if `folder` cannot be written or lacks `needed` bytes."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise CnnlabError(f"cannot write to {folder}: {e.strerror or e}") from None
    if free < needed:
        raise CnnlabError(f"{folder} has {free / 2**20:,.0f} MB free but {what} needs about "
                          f"{needed / 2**20:,.0f} MB; free some space or choose another --out")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")
