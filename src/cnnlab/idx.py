"""MNIST and Fashion-MNIST in their official IDX files (http://yann.lecun.com/exdb/mnist/).

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

An IDX file is a big-endian header (two zero bytes, a type code, the number of dimensions, then one
4-byte size per dimension) followed by the values. The files carry no class names: MNIST's are the
digits; Fashion-MNIST's are the standard ten below, used when the folder's name says "fashion".
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from .errors import CnnlabError

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
UBYTE = 0x08  # the only value type the official files use


def find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def is_idx_folder(folder: Path) -> bool:
    return find(folder, FILES["train_images"]) is not None


def read_idx(path: Path, dims: int) -> np.ndarray:
    """One IDX file of unsigned bytes with `dims` dimensions, checked against its own header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CnnlabError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 + 4 * dims or raw[0] != 0 or raw[1] != 0 or raw[2] != UBYTE or raw[3] != dims:
        raise CnnlabError(f"{path} is not an IDX file of unsigned bytes with {dims} dimension(s)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    body = raw[4 + 4 * dims:]
    if len(body) != math.prod(shape):  # Python integers: np.prod wrapped 2**64 round to 0
        raise CnnlabError(f"{path} has {len(body):,} bytes of data but its header says {shape}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def read_folder(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    paths = {key: find(folder, name) for key, name in FILES.items()}
    missing = [FILES[key] for key, p in paths.items() if p is None]
    if missing:
        raise CnnlabError(f"{folder} is missing {', '.join(missing)} (with or without .gz)")
    arrays = {}
    for split in ("train", "test"):
        x = read_idx(paths[f"{split}_images"], 3)
        y = read_idx(paths[f"{split}_labels"], 1).astype(np.int64)
        if len(x) != len(y):
            raise CnnlabError(f"{paths[f'{split}_images']} has {len(x)} images but its labels file has {len(y)}")
        arrays[split] = (x[:, None].copy(), y)  # (N, 1, H, W): one grey channel
    classes = FASHION_CLASSES if "fashion" in str(folder.resolve()).lower() else MNIST_CLASSES
    return arrays["train"], arrays["test"], classes
