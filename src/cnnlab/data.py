"""Data sets in memory: find them, read any supported layout, cache the decoded pixels, split them.

Every layout ends up as the same `Dataset`: uint8 image tensors (N, C, H, W) and int64 labels.
Normalization happens later, on whole batches (see `Normalization`), so the set stays small in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import cifar, idx
from .errors import CnnlabError
from .files import atomic_path
from .images import decode_image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CACHE_VERSION = 1  # bump when the cached arrays' meaning changes


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

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.x_train.shape[2:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
        val = stratified_pick(self.y_train, round(fraction * len(self.y_train)), seed, self.num_classes)
        if len(val) == 0 or len(val) == len(self.y_train):
            raise CnnlabError(f"--val-split {fraction} of {len(self.y_train)} training images leaves an empty set")
        keep = torch.ones(len(self.y_train), dtype=torch.bool)
        keep[val] = False
        return replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep], x_val=self.x_train[val],
                       y_val=self.y_train[val])

    @property
    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What training reports as val_loss/val_acc: the held-out set, else the test set."""
        return (self.x_val, self.y_val) if self.x_val is not None else (self.x_test, self.y_test)


@dataclass
class Normalization:
    """How uint8 pixels become network inputs: x / 255, then (x - mean) / std per channel."""

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @staticmethod
    def fit(x: torch.Tensor) -> Normalization:
        """Per-channel statistics of a uint8 (N, C, H, W) set, on the [0, 1] scale."""
        xf = x.float().div_(255)
        return Normalization(tuple(xf.mean((0, 2, 3)).tolist()), tuple(xf.std((0, 2, 3)).tolist()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        std = torch.tensor(self.std, dtype=torch.float64).expand(c)
        scale = (1 / (255 * std)).float().view(1, c, 1, 1).to(x.device)
        shift = (-torch.tensor(self.mean, dtype=torch.float64).expand(c) / std).float().view(1, c, 1, 1).to(x.device)
        # uint8 * float gives floats: two passes over the batch where (x / 255 - mean) / std took four
        return (x * scale).add_(shift)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> Normalization:
        return Normalization(tuple(d["mean"]), tuple(d["std"]))


def stratified_pick(y: torch.Tensor, count: int, seed: int, num_classes: int) -> torch.Tensor:
    """Indices of `count` items with each class in proportion, chosen by a seeded shuffle, sorted.

    Shares are rounded by largest remainder, so the total is exactly `count`.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = torch.bincount(y, minlength=num_classes).double()
    exact = sizes * count / max(len(y), 1)
    take = exact.floor()
    extra = count - int(take.sum())
    take[torch.argsort(exact - take, descending=True, stable=True)[:extra]] += 1
    picked = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:int(take[c])]])
    return torch.cat(picked).sort().values


# ---------------------------------------------------------------------------------------------------
# Where the data lives


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
        raise CnnlabError(f"{path} is a file but not a CIFAR-10 or CIFAR-100 .tar.gz archive")
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
    if (path / "train").is_dir():
        return "image-folder", path
    for sub in ("cifar-10-batches-py", "cifar-10-batches-bin", "cifar-100-python"):
        if (path / sub).is_dir():
            return detect_format(path / sub)
    raise CnnlabError(
        f"unknown data layout at {path}: expected a CIFAR-10 or CIFAR-100 archive or folder, "
        "cifar-10-batches-bin/, MNIST-style IDX files (train-images-idx3-ubyte[.gz], ...), "
        "or an image folder with train/<class>/ subfolders")


# ---------------------------------------------------------------------------------------------------
# Image folders


def _class_files(split_dir: Path, classes: list[str] | None = None) -> list[tuple[Path, int]]:
    names = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = names
        if not classes:
            raise CnnlabError(f"{split_dir} has no class folders")
    items = []
    for name in names:
        if name not in classes:
            raise CnnlabError(f"{split_dir / name} is a class that {split_dir.parent / 'train'} does not have")
        files = sorted(f for f in (split_dir / name).iterdir()
                       if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
        if not files:
            raise CnnlabError(f"class folder {split_dir / name} has no images (.png .jpg .jpeg .bmp .webp)")
        items += [(f, classes.index(name)) for f in files]
    return items


def _decode(file: Path, size: tuple[int, int] | None) -> np.ndarray | str:
    """One image as an (H, W, 3) or (H, W) uint8 array, resized to `size` (H, W) when given; or why not."""
    try:
        arr = decode_image(file, None, size)
    except CnnlabError as e:
        return str(e)
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def _decode_all(files: list[Path], size: tuple[int, int] | None, desc: str) -> list[np.ndarray | str]:
    # PIL releases the GIL while decoding, so threads overlap the two cores.
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        decoded = pool.map(lambda f: _decode(f, size), files, chunksize=256)
        return list(tqdm(decoded, total=len(files), desc=desc, unit="img", leave=False, disable=None))


def read_image_folder(root: Path, image_size: tuple[int, int] | None = None, skip_bad: bool = False):
    """Decode `root/train/<class>/*` and, when present, `root/test/<class>/*`.

    Images are resized to `image_size`, or to the size of the first readable training image. The set is
    grayscale only when every image is; otherwise grayscale images are repeated to three channels.
    Unreadable files are all listed in one error, or with `skip_bad` left out and returned as `skipped`.
    """
    train_items = _class_files(root / "train")
    classes = sorted({d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith(".")})
    test_items = _class_files(root / "test", classes) if (root / "test").is_dir() else []
    items = train_items + test_items
    if image_size is None:
        first = next((a for f, _ in train_items if not isinstance(a := _decode(f, None), str)), None)
        image_size = first.shape[:2] if first is not None else (1, 1)
    arrays = _decode_all([f for f, _ in items], image_size, f"decoding {root.name}")
    bad = [a for a in arrays if isinstance(a, str)]  # each message names its file
    if bad and not skip_bad:
        shown = "; ".join(bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise CnnlabError(f"{len(bad)} unreadable image file(s): {shown}. Fix or remove them, "
                          "or pass --skip-bad-images to leave them out")
    keep = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
    n = sum(1 for i in keep if i < len(train_items))
    for split, lo, hi in (("train", 0, len(train_items)), ("test", len(train_items), len(items))):
        empty = {items[i][1] for i in range(lo, hi)} - {items[i][1] for i in keep if lo <= i < hi}
        if empty:
            raise CnnlabError(f"no readable images left in {split}/ for class(es) "
                              f"{', '.join(classes[k] for k in sorted(empty))}")
    arrays = [arrays[i] for i in keep]
    rgb = any(a.ndim == 3 for a in arrays)
    arrays = [np.repeat(a[:, :, None], 3, 2) if rgb and a.ndim == 2 else a for a in arrays]
    x = np.stack(arrays)
    x = x.transpose(0, 3, 1, 2) if rgb else x[:, None]
    y = np.array([items[i][1] for i in keep], dtype=np.int64)
    test = (x[n:], y[n:]) if test_items else None
    return (x[:n], y[:n]), test, classes, bad


# ---------------------------------------------------------------------------------------------------
# The decoded-pixel cache


def fingerprint(path: Path) -> str:
    """A key that changes when any file under `path` changes path, size or modification time."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{path.resolve()}".encode())
    stack = [path]
    while stack:
        p = stack.pop()
        if p.is_dir():
            with os.scandir(p) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                if e.is_dir():
                    stack.append(Path(e.path))
                else:
                    st = e.stat()
                    h.update(f"{e.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _read_source(fmt: str, path: Path, image_size: tuple[int, int] | None, label_mode: str, skip_bad: bool):
    """(train, test or None, classes, skipped files) from any supported layout."""
    if fmt == "image-folder":
        return read_image_folder(path, image_size, skip_bad)
    if fmt == "cifar-python":
        return *cifar.read_python(path), []
    if fmt == "cifar-binary":
        return *cifar.read_binary(path), []
    if fmt == "cifar100-python":
        return *cifar.read_python100(path, label_mode), []
    return *idx.read_folder(path), []


def _load_arrays(fmt: str, path: Path, image_size: tuple[int, int] | None, use_cache: bool, label_mode: str,
                 skip_bad: bool):
    key = fingerprint(path) + (f"-{image_size[0]}x{image_size[1]}" if image_size else "")
    key += "-coarse" if fmt == "cifar100-python" and label_mode == "coarse" else ""
    key += "-skipbad" if fmt == "image-folder" and skip_bad else ""  # without the flag, bad files must fail
    cache_file = cache_dir() / "decoded" / f"{key}.npz"
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                test = (z["x_test"], z["y_test"]) if "x_test" in z else None
                skipped = json.loads(str(z["skipped"])) if "skipped" in z else []
                return (z["x_train"], z["y_train"]), test, json.loads(str(z["classes"])), skipped
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache file is rebuilt below
    train, test, classes, skipped = _read_source(fmt, path, image_size, label_mode, skip_bad)
    if use_cache:
        arrays = {"x_train": train[0], "y_train": train[1], "classes": np.array(json.dumps(classes)),
                  "skipped": np.array(json.dumps(skipped))}
        if test is not None:
            arrays.update(x_test=test[0], y_test=test[1])
        try:
            with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
        except (OSError, CnnlabError):
            pass  # a read-only or full cache only costs speed
    return train, test, classes, skipped


def load_dataset(path: str | os.PathLike | None = None, *, val_fraction: float = 0.1, split_seed: int = 0,
                 image_size: tuple[int, int] | None = None, use_cache: bool = True, label_mode: str = "fine",
                 class_names: list[str] | None = None, skip_bad_images: bool = False) -> Dataset:
    """Find, read (or take from the cache) and split a data set. See `resolve_path` for the search order.

    `label_mode` picks CIFAR-100's fine or coarse labels; `class_names` renames the classes in order;
    `skip_bad_images` leaves unreadable image files out (listed in `Dataset.skipped`) instead of failing.
    """
    fmt, src = detect_format(resolve_path(path))
    (x, y), test, classes, skipped = _load_arrays(fmt, src, image_size, use_cache, label_mode, skip_bad_images)
    num_classes = int(y.max()) + 1 if len(y) else 0
    if len(classes) < num_classes:
        classes = classes + [str(i) for i in range(len(classes), num_classes)]
    if class_names:
        if len(class_names) != len(classes):
            raise CnnlabError(f"--class-names gives {len(class_names)} names, but {src} has {len(classes)} classes")
        classes = list(class_names)
    x_t, y_t = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    if test is not None:
        split = "test/ folder" if fmt == "image-folder" else "official test set"
        return Dataset(x_t, y_t, torch.from_numpy(np.ascontiguousarray(test[0])), torch.from_numpy(test[1]),
                       classes, fmt, str(src.resolve()), split, skipped=tuple(skipped))
    val = stratified_pick(y_t, round(val_fraction * len(y_t)), split_seed, len(classes))
    keep = torch.ones(len(y_t), dtype=torch.bool)
    keep[val] = False
    split = f"stratified {val_fraction:.0%} of train/ held out (seed {split_seed})"
    return Dataset(x_t[keep], y_t[keep], x_t[val], y_t[val], classes, fmt, str(src.resolve()), split,
                   skipped=tuple(skipped))


def info(ds: Dataset) -> str:
    """A human-readable description: format, classes, image size, counts per class and split."""
    tr, te = Counter(ds.y_train.tolist()), Counter(ds.y_test.tolist())
    h, w = ds.image_size
    width = max(len("class"), *(len(c) for c in ds.classes))
    lines = [f"source:      {ds.source}", f"format:      {ds.format}",
             f"image size:  {h}x{w}, {ds.channels} channel{'s' if ds.channels > 1 else ''}",
             f"classes:     {ds.num_classes}", f"test split:  {ds.split}", "",
             f"{'class':<{width}}  {'train':>7}  {'test':>7}"]
    lines += [f"{c:<{width}}  {tr.get(i, 0):>7}  {te.get(i, 0):>7}" for i, c in enumerate(ds.classes)]
    lines.append(f"{'total':<{width}}  {len(ds.y_train):>7}  {len(ds.y_test):>7}")
    return "\n".join(lines)
