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

from cnnlab.errors import CnnlabError

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
UBYTE = 0x08  # the only value type the official files use
MAX_BYTES = 2**31  # 45 times MNIST's training images: a header that declares more is refused before reading


def find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def is_idx_folder(folder: Path) -> bool:
    return find(folder, FILES["train_images"]) is not None


def read_idx(path: Path, dims: int) -> np.ndarray:
    """One IDX file of unsigned bytes with `dims` dimensions, checked against its own header.

    The header is read first and the data after it only up to the size it declares (plus one byte, to see
    whether more follows): a small .gz that would inflate to gigabytes is refused without being inflated.
    """
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            head = f.read(4 + 4 * dims)
            if len(head) < 4 + 4 * dims or head[0] != 0 or head[1] != 0 or head[2] != UBYTE or head[3] != dims:
                raise CnnlabError(f"{path} is not an IDX file of unsigned bytes with {dims} dimension(s)")
            shape = tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
            size = math.prod(shape)  # Python integers: np.prod wrapped 2**64 round to 0
            if size > MAX_BYTES:
                raise CnnlabError(f"{path}: its header says {shape}, {size:,} bytes, more than cnnlab reads "
                                  f"({MAX_BYTES:,})")
            body = f.read(size + 1)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CnnlabError(f"cannot read {path}: {e}") from None
    if len(body) != size:
        what = "more data" if len(body) > size else f"{len(body):,} bytes of data"
        raise CnnlabError(f"{path} has {what} than its header says: {shape}, {size:,} bytes")
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
