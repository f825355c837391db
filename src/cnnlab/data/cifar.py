"""Readers for the official CIFAR-10 distributions, and the verified download of the python archive.

Layouts (https://www.cs.toronto.edu/~kriz/cifar.html):
- python: `cifar-10-batches-py/` with pickled `data_batch_1..5`, `test_batch`, `batches.meta`,
  or the archive `cifar-10-python.tar.gz` holding that folder (read in place, never extracted);
- binary: `cifar-10-batches-bin/` with `data_batch_1..5.bin`, `test_batch.bin` (3073-byte records:
  one label byte, then 1024 red, 1024 green, 1024 blue bytes) and `batches.meta.txt`;
- CIFAR-100 python: `cifar-100-python/` with pickled `train`, `test` and `meta` (100 fine labels in 20
  coarse superclasses), or `cifar-100-python.tar.gz`.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cnnlab.errors import CnnlabError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
MAX_MEMBER = 2**28  # 256 MB: CIFAR-100's training file, the largest, is 155 MB
Arrays = tuple[np.ndarray, np.ndarray]  # images (N, 3, 32, 32) uint8, labels (N,) int64


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and NumPy arrays only: a crafted batch file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, object]:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:
        raise CnnlabError(f"{where} is not a readable CIFAR batch: {e}") from None
    if not isinstance(obj, dict):
        raise CnnlabError(f"{where} is not a readable CIFAR batch: expected a dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch_arrays(batch: dict[str, object], where: str, labels: str = "labels") -> Arrays:
    try:
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[labels], dtype=np.int64)
    except (KeyError, ValueError) as e:
        raise CnnlabError(f"{where} is not a readable CIFAR batch: {e}") from None
    if len(x) != len(y):
        raise CnnlabError(f"{where} has {len(x)} images but {len(y)} labels")
    return x, y


def _concat(parts: list[Arrays]) -> Arrays:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """The named files from a folder, or from anywhere inside a .tar(.gz) archive (read in place)."""
    files: dict[str, bytes] = {}
    if path.is_dir():
        for name in wanted:
            if (path / name).is_file():
                files[name] = (path / name).read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    name = os.path.basename(member.name)
                    if member.isfile() and name in wanted:
                        if member.size > MAX_MEMBER:  # declared in the tar header, before anything inflates
                            raise CnnlabError(f"{path}: {member.name} declares {member.size:,} bytes, more than "
                                              f"any CIFAR file ({MAX_MEMBER:,}); not a CIFAR archive")
                        files[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            first = str(e).splitlines()[0].rstrip(":") if str(e) else type(e).__name__
            if "could not be opened successfully" in first:  # tarfile lists each method it tried, a line each
                first = "not a gzip, bzip2, xz or tar file"
            raise CnnlabError(f"cannot read archive {path}: {first}") from None
    return files


def _names(meta: dict[str, object], key: str) -> list[str]:
    return [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(key, [])]


def read_python(path: Path) -> tuple[Arrays, Arrays, list[str]]:
    """Read the python version from its folder or its .tar.gz archive."""
    wanted = {*TRAIN_BATCHES, "test_batch", "batches.meta"}
    files = _read_members(path, wanted)
    missing = sorted(wanted - files.keys())
    if missing:
        raise CnnlabError(f"{path} is missing {', '.join(missing)} (not a complete CIFAR-10 python set)")
    train = _concat([_batch_arrays(_unpickle(files[n], f"{path}/{n}"), f"{path}/{n}") for n in TRAIN_BATCHES])
    test = _batch_arrays(_unpickle(files["test_batch"], f"{path}/test_batch"), f"{path}/test_batch")
    meta = _unpickle(files["batches.meta"], f"{path}/batches.meta")
    return train, test, _names(meta, "label_names")


def read_python100(path: Path, label_mode: str = "fine") -> tuple[Arrays, Arrays, list[str]]:
    """Read CIFAR-100 (folder or archive) with its 100 fine or 20 coarse labels."""
    if label_mode not in ("fine", "coarse"):
        raise CnnlabError(f"unknown label mode {label_mode!r}; use fine (100 classes) or coarse (20 superclasses)")
    files = _read_members(path, {"train", "test", "meta"})
    missing = sorted({"train", "test", "meta"} - files.keys())
    if missing:
        raise CnnlabError(f"{path} is missing {', '.join(missing)} (not a complete CIFAR-100 python set)")
    key = f"{label_mode}_labels"
    train = _batch_arrays(_unpickle(files["train"], f"{path}/train"), f"{path}/train", key)
    test = _batch_arrays(_unpickle(files["test"], f"{path}/test"), f"{path}/test", key)
    return train, test, _names(_unpickle(files["meta"], f"{path}/meta"), f"{key[:-1]}_names")


def _read_bin(file: Path) -> Arrays:
    raw = np.fromfile(file, dtype=np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise CnnlabError(f"{file} is not a CIFAR-10 binary batch: {raw.size} bytes is not a multiple of 3073")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64)


def read_binary(path: Path) -> tuple[Arrays, Arrays, list[str]]:
    """Read the binary version from its folder."""
    names = [f"{n}.bin" for n in TRAIN_BATCHES] + ["test_batch.bin"]
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise CnnlabError(f"{path} is missing {', '.join(missing)} (not a complete CIFAR-10 binary set)")
    train = _concat([_read_bin(path / n) for n in names[:-1]])
    test = _read_bin(path / "test_batch.bin")
    meta = path / "batches.meta.txt"
    classes = [ln.strip() for ln in meta.read_text().splitlines() if ln.strip()] if meta.is_file() else []
    return train, test, classes


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dest: Path, url: str | None = None, md5: str | None = None) -> Path:
    """Download the archive to `dest` through a `.part` file; on any failure nothing is left behind."""
    url, md5 = url or URL, md5 or MD5
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}", disable=None)
            with bar:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        got = md5sum(part)
        if got != md5:
            raise CnnlabError(f"download of {url} is corrupt (MD5 {got}, expected {md5}); nothing was kept")
        os.replace(part, dest)
    except CnnlabError:
        part.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        part.unlink(missing_ok=True)
        raise CnnlabError(f"cannot download CIFAR-10 from {url}: {e}; pass --data PATH to a local copy") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest
