"""Atomic file writes: a crash, Ctrl-C or SIGKILL leaves either the old file or the new one, never half of one;
and `exclusive`, a lock that one process of a machine holds while it makes a file the others then read.

An output path that is a character device or FIFO (/dev/null, /dev/stdout, a named pipe) is written through, as
the shell's `>` would; a folder, socket or block device is refused in one line. None is ever renamed over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnnlab.errors import CnnlabError


@contextmanager
def exclusive(lock: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the file lock `lock` (flock: the kernel releases it if the process dies), calling `on_wait` first
    when another process holds it. The lock file is removed while held: a process still waiting on it looks for
    the finished result before making it, and one arriving later makes a new lock. Without a writable folder
    there is nothing to share, and no lock."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, backup: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    With `backup`, the file being replaced is first renamed to `backup`, so that the previous version
    survives until the new one is complete. A failed write (a full disk, say) is a CnnlabError naming
    the file, and leaves no temporary file behind.
    """
    path = Path(path)
    kind = special_kind(path)
    if kind in ("character device", "FIFO"):  # /dev/null, /dev/stdout, a pipe: written through, as `>` would
        yield from _write_through(path)
        return
    if kind is not None:  # a rename over it would replace it (or fail): refused
        raise CnnlabError(f"cannot write {path}: it is a {kind}, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; results should read like any other file
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


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (a folder of several files,
    such as an OpenVINO model's .xml and .bin, appears whole or not at all). On failure it is removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CnnlabError(f"cannot write {path}: it exists and is not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    old = tmp.with_suffix(".old")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes folders private; results should read like any other
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def allocate(path: str | os.PathLike, nbytes: int) -> None:
    """Create `path` with `nbytes` of disk reserved now (posix_fallocate). A file that is only truncated to size
    is sparse: writing its pages through a mapping when the disk fills kills the process with SIGBUS, silently
    (two cache builds at once on a nearly full disk both died so, exit 135). Reserved, a full disk is one line
    here, before anything is written."""
    with open(path, "wb") as f:
        if nbytes <= 0:
            return
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                f.truncate(nbytes)  # a file system without fallocate (EOPNOTSUPP): sparse, as before
                return
            raise CnnlabError(f"no room for {path} ({nbytes / 1e6:,.0f} MB) on its disk: free some space, or set "
                              "CNNLAB_CACHE to a larger disk") from None


def special_kind(path: Path) -> str | None:
    """What an existing output path is when it is not a regular file (None: missing, or a regular file)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = {stat.S_ISDIR: "folder", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
             stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket"}
    return next((name for test, name in kinds.items() if test(mode)), None)


def _write_through(path: Path) -> Iterator[Path]:
    """Yield a temporary file (in the temporary folder, not beside a device); then copy it into `path`."""
    fd, tmp = tempfile.mkstemp(prefix="cnnlab-", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as src, open(path, "wb") as out:
            shutil.copyfileobj(src, out)
    except OSError as e:
        raise CnnlabError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp_path.unlink(missing_ok=True)


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
