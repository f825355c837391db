"""Whether a decoded-cache entry is still what was written: checked on every open, rebuilt when it is not.

A damaged entry used to be read silently (zeroed pixels evaluated to chance and rewrote a run's metrics;
shuffled labels trained to chance) or to end in an internal error (a truncated pixel file, a meta.json of
`null`). Now, every open checks, cheaply:
- meta.json's shape: the fields and types the readers use (counts, classes, image size, channels);
- each split's pixel file has exactly the bytes its counts and image size call for;
- each split's labels load, have the right length and class range, and match the digest taken when written;
- the per-image digests file has one digest per image.
The pixels themselves are compared with their per-image digests (cache.digests) on open when the entry holds
at most FULL_CHECK_BYTES of pixels, and always by `cnnlab data check`: digesting CIFAR-10's 184 MB took 0.35 s,
while a 2.7 GB photo set would read every page of a set that is memory-mapped precisely so that it need not be.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

FULL_CHECK_BYTES = 512 * 2**20


def labels_digest(labels: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(labels, np.int64).tobytes(), digest_size=16).hexdigest()


def damage(folder: Path, meta: object, full: bool | None = None) -> str | None:
    """Why the entry in `folder` cannot be used as it is (None: it can). `full`: compare every image with its
    digest (None: when the pixels are at most FULL_CHECK_BYTES)."""
    why = _meta_damage(meta)
    if why:
        return why
    c, (h, w) = meta["channels"], meta["image_size"]
    total = 0
    for split, count in meta["counts"].items():
        n = count["total"]
        u8 = folder / f"{split}.u8"
        size = u8.stat().st_size if u8.is_file() else -1
        if n and size != n * c * h * w:
            return f"{split}.u8 holds {size:,} bytes, not {n * c * h * w:,}"
        total += max(size, 0)
        why = _labels_damage(folder, split, n, len(meta["classes"]), meta.get("label_digests", {}).get(split))
        if why:
            return why
    if full or (full is None and total <= FULL_CHECK_BYTES):
        return pixels_damage(folder, meta)
    return None


def _meta_damage(meta: object) -> str | None:
    if not isinstance(meta, dict):
        return "meta.json is not an object"
    counts, classes, size = meta.get("counts"), meta.get("classes"), meta.get("image_size")
    if not (isinstance(classes, list) and classes and all(isinstance(k, str) for k in classes)):
        return "meta.json has no list of class names"
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return "meta.json has no image size"
    if meta.get("channels") not in (1, 3):
        return "meta.json has no channel count"
    if not (isinstance(counts, dict) and "train" in counts and all(
            isinstance(v, dict) and isinstance(v.get("total"), int) and v["total"] >= 0 for v in counts.values())):
        return "meta.json has no image counts"
    if not isinstance(meta.get("skipped", []), list):
        return "meta.json's skipped files are not a list"
    return None


def _labels_damage(folder: Path, split: str, n: int, num_classes: int, digest: str | None) -> str | None:
    try:
        y = np.load(folder / f"{split}.labels.npy", allow_pickle=False)
        digests = np.load(folder / f"{split}.digest.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return f"{split}'s labels or digests cannot be read"
    if y.shape != (n,) or y.dtype != np.int64 or (n and (y.min() < 0 or y.max() >= num_classes)):
        return f"{split}.labels.npy does not hold {n:,} class indices"
    if digest is not None and labels_digest(y) != digest:
        return f"{split}.labels.npy differs from the labels written"
    if digests.shape != (n,):
        return f"{split}.digest.npy does not hold {n:,} digests"
    return None


def pixels_damage(folder: Path, meta: dict) -> str | None:
    """Compare every image with the digest written when it was decoded."""
    from cnnlab.data.cache import Entry, digests

    entry = Entry(folder, meta)
    for split in entry.splits:
        bad = np.flatnonzero(digests(entry.images(split)) != entry.digests(split))
        if len(bad):
            return f"{len(bad):,} image(s) of {split}.u8 differ from what was decoded"
    return None
