"""Data sets as tensors: load any supported layout through the decoded-pixel cache, split, normalize.

Every layout ends up as the same `Dataset`: uint8 image tensors (N, C, H, W), memory-mapped from the
cache (cache.py) so that a set larger than memory trains batch by batch, and int64 labels.
Normalization happens later, on whole batches (see `Normalization`); its statistics are computed in
bounded chunks, so nothing here makes a float copy of the whole set.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from cnnlab.config import DataConfig
from cnnlab.data import cache, folders
from cnnlab.data.description import describe
from cnnlab.data.images import Resize
from cnnlab.data.sources import cache_dir, detect_format, resolve_path  # noqa: F401  (part of this module's API)
from cnnlab.device import to_device
from cnnlab.errors import CnnlabError

# ---------------------------------------------------------------------------------------------------
# The in-memory data set


@dataclass
class Dataset:
    x_train: torch.Tensor  # (N, C, H, W) uint8
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    format: str  # cifar-python | cifar-binary | cifar100-python | idx | image-folder
    source: str  # the path it was read from
    split: str  # where the test set came from, recorded in each run
    x_val: torch.Tensor | None = None  # a validation set held out of the training data (--val-split);
    y_val: torch.Tensor | None = None  # without one, training validates on the test set as the tutorial does
    skipped: tuple[str, ...] = ()  # why each unreadable image file was left out (--skip-bad-images), naming it
    resize: str | None = None  # how image files reached the input size (crop, pad, squish); None: not resized
    layout: str = ""  # image trees: split folders, class folders or csv
    ignored: dict[str, int] = field(default_factory=dict)  # files left out as hidden or not images, counted
    test_files: tuple[str, ...] = ()  # image folders: each test image's file, relative to the data folder
    exact_copies: dict[str, int] = field(default_factory=dict)  # training images with a val/test image's pixels
    doubted: dict[str, tuple[int, ...]] = field(default_factory=dict)  # rows `data check --labels` doubts, per split
    pixels_digest: str = ""  # of the decoded pixels of every split (the cache entry's digests); "" if not decoded
    source_side: int | None = None  # image files: the median shorter side before resizing; None for arrays
    cache_folder: str = ""  # the cache entry it was mapped from (image_files reads its file lists on demand)

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.x_train.shape[2:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_files(self, split: str) -> list[Path]:
        """Image folders and CSV lists: the files the cache decoded for `split` (before --subset; the training
        images include those --val-split holds out), read from the cache when asked rather than held by every
        run; [] for arrays."""
        if not self.cache_folder:
            return []
        root = folders.files_root(Path(self.source))
        return [root / name for name in cache.Entry(Path(self.cache_folder), {}).files(split)]

    def subset(self, n: int, seed: int) -> Dataset:
        """A seeded, stratified subset of `n` training images (the test set stays whole)."""
        if n >= len(self.y_train):
            return self
        idx = stratified_pick(self.y_train, n, seed, self.num_classes)
        return replace(self, x_train=self.x_train[idx], y_train=self.y_train[idx])

    def hold_out(self, fraction: float, seed: int) -> Dataset:
        """Move a seeded, stratified `fraction` of the training images into a validation set."""
        if not 0 < fraction < 1:
            raise CnnlabError(f"--val-split must be between 0 and 1, got {fraction}")
        if self.x_val is not None:
            raise CnnlabError(f"{self.source} has its own validation folder; leave out --val-split")
        keep, val = (torch.from_numpy(i) for i in folders.hold_out_indices(self.y_train.numpy(), fraction, seed,
                                                                           self.num_classes))
        return replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep], x_val=self.x_train[val],
                       y_val=self.y_train[val])

    @property
    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What training reports as val_loss/val_acc: the held-out set, else the test set."""
        return (self.x_val, self.y_val) if self.x_val is not None else (self.x_test, self.y_test)


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """--class-weights auto: N / (classes x count) per class, so that every class weighs the same in the loss."""
    counts = torch.bincount(y, minlength=num_classes).double()
    return torch.where(counts > 0, len(y) / (num_classes * counts.clamp(min=1)), 0.0).float()


@functools.lru_cache(maxsize=64)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], c: int, device: torch.device,
               unit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalization's per-channel constants (1, c, 1, 1) on `device`, made once per device: a copy to a GPU
    per batch would make each step wait for the host. Scale and shift from uint8 (x * scale + shift), or
    with `unit` the mean and std on the [0, 1] scale."""
    if unit:
        values = torch.tensor(mean).expand(c), torch.tensor(std).expand(c)
    else:
        s = torch.tensor(std, dtype=torch.float64).expand(c)
        values = 1 / (255 * s), -torch.tensor(mean, dtype=torch.float64).expand(c) / s
    # not waited for (to_device): a plain copy from pageable memory waits for the GPU, and the first batch of a
    # run makes them inside a step (the first H200 run's sync-debug check stopped there)
    return to_device(tuple(v.float().reshape(1, c, 1, 1) for v in values), device)


@dataclass
class Normalization:
    """How uint8 pixels become network inputs: x / 255, then (x - mean) / std per channel."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @staticmethod
    def fit(x: torch.Tensor) -> Normalization:
        """Per-channel mean and (unbiased) standard deviation of a uint8 (N, C, H, W) set, on the [0, 1] scale.

        Exact, from a histogram of the 256 levels per channel, counted over chunks of 8,192 images: memory stays
        bounded whatever the set's size, and CIFAR-10's 50,000 images take 0.1 s (0.8 s summing float64 copies).
        """
        n, c = len(x), x.shape[1]
        hist = torch.zeros(c, 256, dtype=torch.int64)
        for lo in range(0, n, 8192):
            chunk = x[lo:lo + 8192]
            for k in range(c):
                hist[k] += torch.bincount(chunk[:, k].flatten(), minlength=256)
        count = max(int(hist[0].sum()), 2)
        levels = torch.arange(256, dtype=torch.float64)
        mean = (hist * levels).sum(1) / count
        var = ((hist * levels.square()).sum(1) - count * mean.square()) / (count - 1)
        return Normalization(tuple((mean / 255).tolist()), tuple((var.clamp_min(0).sqrt() / 255).tolist()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = _constants(tuple(self.mean), tuple(self.std), x.shape[1], x.device)
        # uint8 * float gives floats: two passes over the batch where (x / 255 - mean) / std took four
        return (x * scale).add_(shift)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std = _constants(tuple(self.mean), tuple(self.std), x.shape[1], x.device, unit=True)
        return mean.to(x.dtype), std.to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized inputs back to [0, 1] pixels (for augmentations that work on colours)."""
        mean, std = self._stats(x)
        return x * std + mean

    def apply_to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels to network inputs: (x - mean) / std."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Normalization:
        return Normalization(tuple(d["mean"]), tuple(d["std"]))


def stratified_pick(y: torch.Tensor, count: int, seed: int, num_classes: int) -> torch.Tensor:
    """Sorted indices of `count` items with each class in proportion, by a seeded shuffle (folders.py)."""
    return torch.from_numpy(folders.stratified_pick(y.numpy(), count, seed, num_classes))


# ---------------------------------------------------------------------------------------------------
# Loading


def load_dataset(path: str | os.PathLike | None = None, *, val_fraction: float = 0.1, split_seed: int = 0,
                 image_size: tuple[int, int] | None = None, use_cache: bool = True, label_mode: str = "fine",
                 class_names: list[str] | None = None, skip_bad_images: bool = False,
                 resize: Resize = "crop") -> Dataset:
    """Find a data set, decode it once into the cache (cache.py) and map it. See `resolve_path` for the search
    order, and `DataConfig` for what each setting does."""
    return load(DataConfig(path=None if path is None else str(path), val_fraction=val_fraction,
                           split_seed=split_seed, image_size=tuple(image_size) if image_size else None,
                           label_mode=label_mode, class_names=tuple(class_names) if class_names else None,
                           skip_bad_images=skip_bad_images, resize=resize), use_cache)


def load(c: DataConfig, use_cache: bool = True) -> Dataset:
    """The data set a `DataConfig` describes, before `--val-split` and `--subset` (see `train`)."""
    entry = cache.entry_for(c, use_cache)
    meta = entry.meta

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if name not in entry.splits:
            return None, None
        return torch.from_numpy(entry.images(name)), torch.from_numpy(entry.labels(name))
    (x, y), (xv, yv), (xt, yt) = split("train"), split("val"), split("test")
    return Dataset(x, y, xt, yt, meta["classes"], meta["format"], meta["source"], meta["split"], xv, yv,
                   skipped=tuple(meta["skipped"]), resize=meta.get("resize"), layout=meta.get("layout", ""),
                   ignored=dict(meta.get("ignored", {})), test_files=tuple(entry.files("test")),
                   exact_copies=dict(meta.get("exact_copies", {})), doubted=entry.doubted(),
                   pixels_digest=cache.pixels_digest(entry), source_side=_median_side(entry.sizes("train")),
                   cache_folder=str(entry.folder))


def _median_side(sizes: np.ndarray | None) -> int | None:
    return int(np.median(sizes.min(axis=1))) if sizes is not None and len(sizes) else None


def fingerprint(ds: Dataset) -> dict:
    """What processes on several machines must agree on before they train together (dist.agree): the classes,
    the number of images, the labels and the pixels, each as its own entry so a difference can be named."""
    def digest(*ys: torch.Tensor | None) -> str:
        h = hashlib.sha256()
        for y in ys:
            h.update(b"-" if y is None else y.numpy().astype(np.int64).tobytes())
        return h.hexdigest()[:16]
    return {"classes": ds.classes, "training images": len(ds.y_train), "test images": len(ds.y_test),
            "validation images": None if ds.y_val is None else len(ds.y_val),
            "labels (a digest)": digest(ds.y_train, ds.y_val, ds.y_test), "pixels (a digest)": ds.pixels_digest}


def info(ds: Dataset) -> str:
    """A human-readable description: format, classes, image size, counts per class and split (description.describe)."""
    def counts(y: torch.Tensor) -> dict:
        return {"total": len(y), "per_class": torch.bincount(y, minlength=ds.num_classes).tolist()}
    meta = {"source": ds.source, "format": ds.format, "layout": ds.layout or ds.format, "resize": ds.resize,
            "image_size": list(ds.image_size), "channels": ds.channels, "classes": ds.classes, "split": ds.split,
            "counts": {"train": counts(ds.y_train), **({"val": counts(ds.y_val)} if ds.y_val is not None else {}),
                       "test": counts(ds.y_test)},
            "ignored": ds.ignored, "skipped": list(ds.skipped)}
    return describe(meta)
