"""Where a data set lives and which layout it has. No PyTorch and no pixels here.

`resolve_path` follows `--data`, else $CNNLAB_DATA, else ~/.cache/cnnlab/, else ~/.keras/datasets/, else
downloads CIFAR-10. `detect_format` names the layout (CIFAR-10/100 in their official forms, MNIST-style
IDX files, or an image tree as folders.py reads it) and the exact path its reader takes.
"""

from __future__ import annotations

import os
from pathlib import Path

from cnnlab.data import cifar, folders, idx
from cnnlab.errors import CnnlabError

FORMATS = ("cifar-python", "cifar-binary", "cifar100-python", "idx", "image-folder")


def cache_dir() -> Path:
    return Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab")


def _find_cifar_in(folder: Path) -> Path | None:
    """CIFAR-10 in one of its official forms, where `resolve_path` looks without being told."""
    for name in ("cifar-10-batches-py", cifar.ARCHIVE_NAME, "cifar-10-batches-bin", "cifar-10-batches-py.tar.gz"):
        if (folder / name).exists():
            return folder / name
    return None


def resolve_path(path: str | os.PathLike | None, download: bool = True) -> Path:
    """`--data`, else $CNNLAB_DATA, else ~/.cache/cnnlab/, else ~/.keras/datasets/, else download."""
    if path is None and os.environ.get("CNNLAB_DATA"):
        path = os.environ["CNNLAB_DATA"]
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise CnnlabError(f"data path {p} does not exist")
        return p
    for folder in (cache_dir(), Path.home() / ".keras" / "datasets"):
        found = _find_cifar_in(folder)
        if found:
            return found
    if not download:
        raise CnnlabError("no CIFAR-10 found in $CNNLAB_DATA, ~/.cache/cnnlab or ~/.keras/datasets; pass --data PATH")
    return cifar.download(cache_dir() / cifar.ARCHIVE_NAME)


def detect_format(path: Path) -> tuple[str, Path]:
    """Name the layout at `path` and the exact path its reader takes."""
    if path.is_file():
        if path.name.startswith("cifar-100") and path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "cifar100-python", path
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "cifar-python", path
        if path.suffix.lower() == ".csv":
            return "image-folder", path
        raise CnnlabError(f"{path} is a file but not a CIFAR-10/100 .tar.gz archive or a CSV of path,label rows")
    if path.exists() and not path.is_dir():
        raise CnnlabError(f"{path} is a device, FIFO or socket, not a data folder, CIFAR archive or CSV")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CnnlabError(f"cannot read data folder {path}: permission denied")
    if (path / "data_batch_1").is_file():
        return "cifar-python", path
    if (path / "data_batch_1.bin").is_file():
        return "cifar-binary", path
    if (path / "train").is_file() and (path / "meta").is_file():
        return "cifar100-python", path
    if idx.is_idx_folder(path):
        return "idx", path
    for sub in ("cifar-10-batches-py", "cifar-10-batches-bin", "cifar-100-python"):
        if (path / sub).is_dir():
            return detect_format(path / sub)
    if folders.is_image_tree(path):
        return "image-folder", path
    raise CnnlabError(
        f"unknown data layout at {path}: expected a CIFAR-10 or CIFAR-100 archive or folder, "
        "cifar-10-batches-bin/, MNIST-style IDX files (train-images-idx3-ubyte[.gz], ...), "
        "image folders (train/<class>/..., or <class>/... directly), or a CSV of path,label rows")
