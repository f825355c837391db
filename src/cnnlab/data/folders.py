"""Finding labelled images on disk: which file is which class, in which split. No pixels are read here.

Layouts, tried in this order (`list_images`):
- a CSV file of `path,label` rows, with an optional third `split` column (train, val or test; fastai's
  `is_valid` True/False too); a header row is optional and may name the columns otherwise (`filename,class`,
  `file,category`...); paths are relative to the CSV's folder;
- split folders: `ROOT/train/<class>/...`, with `val/`, `valid/` or `validation/` as the validation split
  and `test/` as the test split, each `<class>/...` beside train's;
- flat class folders: `ROOT/<class>/...`, from which a seeded, stratified share is held out as the test set.

Under a class folder, images at any depth belong to that class. Hidden files and folders (a leading dot)
and files that are not images are left out and counted, so that `cnnlab data info` can say so.
No PyTorch here: `cnnlab data info` runs without it.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnlab.errors import CnnlabError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
                    ".heic", ".heif", ".avif"}
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Listing:
    """Image files per split ("train", "val", "test"; flat layouts have only "train" until `hold_out`)."""

    layout: str  # "split folders" | "class folders" | "csv"
    classes: list[str]
    files: dict[str, list[str]]  # split -> absolute paths, sorted within each class
    labels: dict[str, np.ndarray]  # split -> int64 class indices
    ignored: Counter = field(default_factory=Counter)  # "hidden" / "not an image" -> count
    split: str = ""  # where the test set comes from, in words

    def hold_out(self, fraction: float, seed: int, into: str = "test") -> Listing:
        """Move a seeded, stratified `fraction` of train into the split `into`: the test set of a flat layout
        or a CSV, or the validation set that --val-split asks for."""
        y = self.labels["train"]
        keep, picked = hold_out_indices(y, fraction, seed, len(self.classes))
        files = np.array(self.files["train"], dtype=object)
        split = f"stratified {fraction:.0%} of the images held out (seed {seed})" if into == "test" else self.split
        return Listing(self.layout, self.classes, {**self.files, "train": list(files[keep]), into: list(files[picked])},
                       {**self.labels, "train": y[keep], into: y[picked]}, self.ignored, split)


def stratified_pick(y: np.ndarray, count: int, seed: int, num_classes: int) -> np.ndarray:
    """Sorted indices of `count` items, each class in proportion (largest remainder), by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    sizes = np.bincount(y, minlength=num_classes).astype(float)
    exact = sizes * count / max(len(y), 1)
    take = np.floor(exact)
    extra = count - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:extra]] += 1
    picked = [rng.permutation(np.flatnonzero(y == c))[:int(take[c])] for c in range(num_classes)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def hold_out_indices(y: np.ndarray, fraction: float, seed: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): sorted indices, with a seeded, stratified `fraction` held out. Neither may be empty."""
    picked = stratified_pick(y, round(fraction * len(y)), seed, num_classes)
    if len(picked) == 0 or len(picked) == len(y):
        raise CnnlabError(f"holding out {fraction:.0%} of {len(y)} training images leaves an empty set")
    keep = np.ones(len(y), bool)
    keep[picked] = False
    return np.flatnonzero(keep), picked


def is_image_tree(path: Path) -> bool:
    """Whether `path` looks like one of the layouts above (a CSV, split folders or class folders of images)."""
    if path.is_file():
        return path.suffix.lower() == ".csv"
    if any((path / name).is_dir() for name in ("train", "test")):
        return True
    return any(d.is_dir() and not d.name.startswith(".") and _has_image(d) for d in path.iterdir())


def _has_image(folder: Path) -> bool:
    for _, dirs, names in walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(Path(n).suffix.lower() in IMAGE_EXTENSIONS and not n.startswith(".") for n in names):
            return True
    return False


def identity(folder: str) -> tuple[int, int]:
    """A folder's (device, inode): one stat, where realpath costs one per path component (a tree 1,100 deep
    took 28 s of system time with realpath)."""
    st = os.stat(folder)
    return st.st_dev, st.st_ino


def walk(top: Path | str, onerror=None):
    """os.walk (top-down, following links) without recursion: Python 3.11's recursive os.walk fails with
    RecursionError on a tree 1,000 folders deep. Yields (folder, sub-folder names, file names); the caller may
    prune or reorder the sub-folder names in place, as with os.walk."""
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            if onerror is not None:
                onerror(e)
            continue
        dirs = [e.name for e in entries if e.is_dir()]
        names = [e.name for e in entries if not e.is_dir()]
        yield folder, dirs, names
        stack += [os.path.join(folder, d) for d in reversed(dirs)]


def _raise(error: OSError) -> None:
    raise CnnlabError(f"cannot read {error.filename}: {error.strerror or error}")


def _walk(folder: Path, ignored: Counter) -> list[str]:
    """Image files at any depth under `folder`, sorted; hidden and other files counted in `ignored`."""
    found, seen = [], set()
    for top, dirs, names in walk(folder, onerror=_raise):
        real = identity(top)
        if real in seen:  # a symbolic link back up the tree: each folder is read once
            dirs[:] = []
            continue
        seen.add(real)
        ignored["hidden"] += sum(1 for d in dirs if d.startswith("."))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                ignored["hidden"] += 1
            elif Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                path = os.path.join(top, name)
                if os.path.isfile(path):  # a FIFO or device named like an image would block or never end
                    found.append(path)
                else:
                    ignored["special (FIFO, device, socket)"] += 1
            else:
                ignored["not an image"] += 1
    return sorted(found)


def _class_folders(split_dir: Path, ignored: Counter) -> dict[str, list[str]]:
    """{class name: its image files} for the class folders directly under `split_dir`."""
    out = {}
    for entry in sorted(split_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            ignored["hidden"] += 1
        elif entry.is_dir():
            files = _walk(entry, ignored)
            if not files:
                raise CnnlabError(f"class folder {entry} has no images ({' '.join(sorted(IMAGE_EXTENSIONS))})")
            out[entry.name] = files
        else:
            ignored["not an image"] += 1  # a loose file beside the class folders belongs to no class
    return out


def _split_folders(root: Path, ignored: Counter) -> Listing:
    splits: dict[str, dict[str, list[str]]] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        split = SPLIT_FOLDERS.get(entry.name.lower()) if entry.is_dir() else None
        if split is None:
            continue
        if split in splits:
            raise CnnlabError(f"{root} has two {split} folders; keep one of them")
        splits[split] = _class_folders(entry, ignored)
    if "train" not in splits:
        raise CnnlabError(f"{root} has split folders but no train/; put the training images in train/<class>/")
    classes = sorted(splits["train"])
    for split, found in splits.items():
        missing = sorted(set(found) - set(classes))
        if missing:
            raise CnnlabError(f"{root / split} has class(es) {', '.join(missing)} that {root / 'train'} does not have")
    files = {s: [f for c in classes for f in found.get(c, [])] for s, found in splits.items()}
    labels = {s: np.array([i for i, c in enumerate(classes) for _ in found.get(c, [])], np.int64)
              for s, found in splits.items()}
    return Listing("split folders", classes, files, labels, ignored, "test/ folder" if "test" in splits else "")


# A CSV's header names its columns; these are the names people (and fastai, Kaggle, Roboflow) give them.
PATH_COLUMNS = ("path", "file", "filename", "file_name", "filepath", "image", "image_path", "img", "fname")
LABEL_COLUMNS = ("label", "class", "category", "target", "class_name", "labels", "y")
SPLIT_COLUMNS = ("split", "set", "subset", "fold", "is_valid", "valid")  # is_valid/valid: fastai's valid_col
SPLIT_VALUES = {**SPLIT_FOLDERS, "training": "train", "testing": "test", "dev": "val"}
TRUE_FALSE = {"true": "val", "1": "val", "yes": "val", "false": "train", "0": "train", "no": "train"}


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [[c.strip() for c in r] for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CnnlabError(f"cannot read {path}: {e}") from None


def _columns(path: Path, rows: list[list[str]]) -> tuple[int, int, int | None, str | None, list[list[str]]]:
    """(path column, label column, split column or None, the split column's name, data rows). A first row whose
    first cell names no file is a header, and its names say which column is which; without one the columns are
    `path,label[,split]`."""
    first = [c.lower() for c in rows[0]] if rows else []
    named = any(c in PATH_COLUMNS + LABEL_COLUMNS + SPLIT_COLUMNS for c in first)
    if not first or not named and (Path(first[0]).suffix in IMAGE_EXTENSIONS or (path.parent / rows[0][0]).is_file()):
        return 0, 1, (2 if rows and len(rows[0]) > 2 else None), "split", rows
    find = lambda names: next((i for i, c in enumerate(first) if c in names), None)  # noqa: E731
    where, label, split = find(PATH_COLUMNS), find(LABEL_COLUMNS), find(SPLIT_COLUMNS)
    if where is None or label is None:
        raise CnnlabError(f"{path}: the header {','.join(rows[0])!r} names no "
                          f"{'image path' if where is None else 'label'} column; name them e.g. `path,label` "
                          f"(path: {', '.join(PATH_COLUMNS[:4])}...; label: {', '.join(LABEL_COLUMNS[:3])}...; "
                          f"an optional split column: {', '.join(SPLIT_COLUMNS[:2])} or is_valid)")
    return where, label, split, first[split] if split is not None else None, rows[1:]


def _split_of(value: str, column: str | None, path: Path, row: int) -> str:
    table = TRUE_FALSE if column in ("is_valid", "valid") else SPLIT_VALUES
    split = table.get(value.lower())
    if split is None:
        raise CnnlabError(f"{path} row {row}: split {value!r} is not one of {', '.join(sorted(set(table)))}")
    return split


def _csv(path: Path, ignored: Counter) -> Listing:
    """A CSV of image paths (relative to the CSV's folder), labels and, optionally, each image's split."""
    all_rows = _read_rows(path)
    where, label, split_col, split_name, rows = _columns(path, all_rows)
    offset = len(all_rows) - len(rows)
    width = max(where, label, split_col or 0) + 1
    bad = next((i for i, r in enumerate(rows) if len(r) < width or not r[where] or not r[label]), None)
    if bad is not None:
        raise CnnlabError(f"{path} row {bad + offset + 1} is not `path,label`: {','.join(rows[bad])!r}")
    missing = [r[where] for r in rows if not (path.parent / r[where]).is_file()]
    if missing:
        raise CnnlabError(f"{path} names {len(missing)} file(s) that do not exist, e.g. {path.parent / missing[0]}")
    classes = sorted({r[label] for r in rows})
    ignored["not an image"] += sum(1 for r in rows if Path(r[where]).suffix.lower() not in IMAGE_EXTENSIONS)
    files: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if Path(r[where]).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        split = _split_of(r[split_col], split_name, path, i + offset + 1) if split_col is not None else "train"
        files.setdefault(split, []).append(str((path.parent / r[where]).resolve()))
        labels.setdefault(split, []).append(classes.index(r[label]))
    if "train" not in files:
        raise CnnlabError(f"{path} has no rows in the train split")
    return Listing("csv", classes, files, {k: np.array(v, np.int64) for k, v in labels.items()}, ignored,
                   f"the CSV's {split_name} column" if "test" in files else "")


def files_root(source: Path) -> Path:
    """What the image files of a listing are kept relative to (in the cache, for captions): an image folder
    itself, or a CSV's folder, as a CSV's paths are."""
    return source if source.is_dir() else source.parent


def csv_paths(path: Path) -> list[Path]:
    """The files a CSV names (its well-formed rows), for the cache key: a CSV's images change without the CSV."""
    try:
        rows = _read_rows(path)
        where, _, _, _, rows = _columns(path, rows)
    except (CnnlabError, OSError, UnicodeError):
        return []  # the listing itself reports what is wrong with the file
    return [path.parent / r[where] for r in rows if len(r) > where and r[where]]


def _flat(root: Path, ignored: Counter) -> Listing:
    found = _class_folders(root, ignored)
    classes = sorted(found)
    return Listing("class folders", classes, {"train": [f for c in classes for f in found[c]]},
                   {"train": np.array([i for i, c in enumerate(classes) for _ in found[c]], np.int64)}, ignored)


def list_images(root: Path, val_fraction: float = 0.1, split_seed: int = 0) -> Listing:
    """Every labelled image under `root` (or in the CSV `root`), with a test split in every case."""
    ignored: Counter = Counter()
    root = root.resolve()
    if root.is_file():
        listing = _csv(root, ignored)
    elif any((root / name).is_dir() for name in SPLIT_FOLDERS):
        listing = _split_folders(root, ignored)
    else:
        listing = _flat(root, ignored)
    if len(listing.classes) < 2:
        found = f"only {listing.classes[0]!r}" if listing.classes else "none"
        raise CnnlabError(f"{root} needs at least two classes to classify, found {found}")
    empty = [c for k, c in enumerate(listing.classes) if not (listing.labels["train"] == k).any()]
    if empty:
        raise CnnlabError(f"{root}: class(es) {', '.join(empty)} have no training images")
    if "test" not in listing.files:
        listing = listing.hold_out(val_fraction, split_seed)
    return listing


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given, and the images at any depth under each folder (sorted; hidden files left out)."""
    out = []
    for p in paths:
        if Path(p).is_dir():
            out += [str(f) for f in sorted(Path(p).rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS
                    and f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        else:
            out.append(p)
    return out
