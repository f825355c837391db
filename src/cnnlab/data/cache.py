"""The decoded-pixel cache: each data set decoded once into uint8 files that are memory-mapped, not loaded.

An entry is a folder `~/.cache/cnnlab/decoded/<key>/` holding, per split ("train", "val", "test"),
`<split>.u8` (raw uint8 pixels, N x C x H x W) and `<split>.labels.npy`, and `meta.json` (classes, sizes,
counts per class, skipped and ignored files). The key changes with the resolved path, every file's size
and modification time, and every setting that changes the pixels (size, resize method, ...), so
`../x` and `/abs/x` share an entry and an edited folder is decoded again.

Opening an entry maps the files copy-on-write: opening costs milliseconds whatever the size, pages come
from the page cache as batches touch them, and a process's own (anonymous) memory does not grow with
the data set. Two processes on one machine share the same pages. CIFAR-sized data goes through the
same path: the mapped set trains as fast as one held in RAM (benchmarks/data_load.py), and loads faster.

Building an entry decodes image files in a pool of threads (one per usable core; Pillow releases the GIL)
that write straight into the mapped file, with a progress bar showing images/s. It is written under a temporary name and
renamed when complete, so a crash or Ctrl-C never leaves a half entry that a later run would read.
No PyTorch here: `cnnlab data info` on cached data reads `meta.json` and nothing else.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnnlab import files
from cnnlab.config import DataConfig
from cnnlab.data import cachedir, cifar, decode, folders, idx, integrity, sources
from cnnlab.data.images import Resize, image_size, resize_to
from cnnlab.errors import CnnlabError

CACHE_VERSION = 5  # bump when an entry's meaning changes (3: image folders record their files' names; 4: and
# their formats, sizes, EXIF turns and transparency, for data info; 5: each image's digest and size as shown, and
# one entry whether or not unreadable files are skipped)
# Images larger than SMALL px are resized to DEFAULT_IMAGE_SIZE unless --image-size says otherwise; smaller
# ones (CIFAR, MNIST and their kind) keep their own size. 96 px: the `photos` preset for 8 epochs on 5,000
# photo-sized images (benchmarks/photos.py --sweep, results/photos_size.json) reached 58.9% at 96 px, 58.3% at
# 128 and 58.5% at 160 in 42, 70 and 106 s: the best accuracy per CPU-second. That benchmark's photos are
# upscaled CIFAR images with no detail beyond 32 px; photos with fine detail may want --image-size 128-224.
DEFAULT_IMAGE_SIZE = 96
SMALL = 64
SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)
SUSPECTS = "label_suspects.json"  # written into a finished entry by `cnnlab data check --labels` (labels.py)


@dataclass(frozen=True)
class Request:
    """Everything that decides an entry's pixels and labels."""

    fmt: str
    path: Path
    image_size: tuple[int, int] | None = None
    resize: Resize = "crop"
    label_mode: str = "fine"
    skip_bad: bool = False
    val_fraction: float = 0.1  # image trees without a test split: the held-out share
    split_seed: int = 0
    val_split: float | None = None  # --val-split: this share of train becomes the "val" split, decoded apart

    def key(self) -> str:
        """Not skip_bad: it changes no pixel, only whether an entry with unreadable files may be used (opening
        decides), so `data check` (which lists them) and training share one decoded copy."""
        settings = {k: v for k, v in asdict(self).items() if k not in ("path", "fmt", "skip_bad")}
        settings["default_size"] = DEFAULT_IMAGE_SIZE  # what image_size None means
        h = hashlib.sha256(f"v{CACHE_VERSION}:{self.fmt}:{json.dumps(settings, default=str)}".encode())
        h.update(fingerprint(self.path.resolve()).encode())
        return h.hexdigest()[:24]


def pixels_digest(entry: Entry) -> str:
    """A digest of every image's pixels in every split, from the entry's per-image digests (no pixel is read)."""
    h = hashlib.sha256()
    for split in sorted(entry.splits):
        try:
            h.update(split.encode() + entry.digests(split).tobytes())
        except OSError:
            return ""
    return h.hexdigest()[:16]


def fingerprint(path: Path) -> str:
    """A key that changes when any file under `path` (or named by the CSV `path`) changes path, size or
    modification time."""
    h = hashlib.sha256(str(path).encode())
    stack, seen = [path], set()
    while stack:
        p = stack.pop()
        if p.is_dir():
            if (real := folders.identity(p)) in seen:
                continue  # a symbolic link back up the tree (folders.py reads each folder once too)
            seen.add(real)
            with os.scandir(p) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                if e.is_dir():
                    stack.append(Path(e.path))
                else:
                    st = e.stat()
                    h.update(f"{e.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            try:
                st = p.stat()
            except OSError:  # a CSV row naming a missing file: the listing says so
                h.update(f"{p}\0missing\n".encode())
                continue
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            if p == path and p.suffix.lower() == ".csv":  # and the images it names, which change without it
                stack += folders.csv_paths(p)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Reading an entry


@dataclass
class Entry:
    folder: Path
    meta: dict

    def images(self, split: str) -> np.ndarray:
        """(N, C, H, W) uint8, memory-mapped copy-on-write (writable, but writes never reach the file)."""
        n, shape = self.meta["counts"][split]["total"], (self.meta["channels"], *self.meta["image_size"])
        if n == 0:
            return np.zeros((0, *shape), np.uint8)
        return np.memmap(self.folder / f"{split}.u8", np.uint8, "c", shape=(n, *shape))

    def labels(self, split: str) -> np.ndarray:
        return np.load(self.folder / f"{split}.labels.npy")

    def digests(self, split: str) -> np.ndarray:
        """Each image's digest of its pixels (see `digests`)."""
        return np.load(self.folder / f"{split}.digest.npy")

    def sizes(self, split: str) -> np.ndarray | None:
        """Image folders: each image's (width, height) as shown, before resizing; None for arrays."""
        path = self.folder / f"{split}.sizes.npy"
        return np.load(path) if path.is_file() else None

    def doubted(self) -> dict[str, tuple[int, ...]]:
        """The rows of each split whose labels `cnnlab data check --labels` doubts ({} before it ran)."""
        try:
            rows = json.loads((self.folder / SUSPECTS).read_text())
        except (OSError, ValueError):
            return {}
        return {s: tuple(int(r) for r in v) for s, v in rows.items() if isinstance(v, list)}

    def files(self, split: str) -> list[str]:
        """The image files of a split, relative to the data folder, in image order ([] for arrays)."""
        path = self.folder / f"{split}.files.json"
        return json.loads(path.read_text()) if path.is_file() else []

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.meta["counts"]]


def entry_for(c: DataConfig, use_cache: bool = True, verify: bool | None = None) -> Entry:
    """The entry for a data configuration: its data found, decoded when not cached, classes renamed as asked.
    `verify`: compare every image with its digest (None: for entries small enough, integrity.py)."""
    fmt, src = sources.detect_format(sources.resolve_path(c.path))
    req = Request(fmt, src.resolve(), tuple(c.image_size) if c.image_size else None, c.resize, c.label_mode,
                  c.skip_bad_images, c.val_fraction, c.split_seed, c.val_split)
    entry = open_entry(req, use_cache, verify)
    if c.class_names:
        if len(c.class_names) != len(entry.meta["classes"]):
            raise CnnlabError(f"--class-names gives {len(c.class_names)} names, but {src} has "
                              f"{len(entry.meta['classes'])} classes")
        entry.meta = {**entry.meta, "classes": list(c.class_names)}
    return entry


def open_entry(req: Request, use_cache: bool = True, verify: bool | None = None) -> Entry:
    """The cached entry for `req`, built first when missing (or, without `use_cache`, built in a temporary
    folder that is removed when the process exits, or by the next build once it has). A process that finds
    another building the same entry waits for it and maps its result instead of decoding it twice."""
    if not use_cache:
        return _build_entry(req, None, Path(tempfile.gettempdir()))
    folder = sources.cache_dir() / "decoded" / req.key()
    entry = _open_existing(req, folder, verify)
    if entry is not None:
        return entry
    with cachedir.one_builder(folder):
        return _open_existing(req, folder, verify) or _build_entry(req, folder, folder.parent)


def _open_existing(req: Request, folder: Path, verify: bool | None) -> Entry | None:
    meta = _read_meta(folder)
    if meta is not None and (why := integrity.damage(folder, meta, verify)):
        log.info(f"warning: the decoded copy of {req.path} is damaged ({why}); decoding it again")
        cachedir.discard(folder)
    elif meta is not None:
        if meta["skipped"] and not req.skip_bad:
            _refuse_unreadable(meta["skipped"])
        return Entry(folder, meta)
    elif folder.exists():  # published entries always hold meta.json: this one lost it
        cachedir.discard(folder)
    return None


def _build_entry(req: Request, folder: Path | None, parent: Path) -> Entry:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        cachedir.clear_abandoned(parent)
        tmp = Path(tempfile.mkdtemp(prefix=cachedir.building_prefix(), dir=parent))
    except OSError:
        if folder is None:
            raise CnnlabError(f"cannot write the decoded images to {parent}") from None
        return _build_entry(req, None, Path(tempfile.gettempdir()))  # a read-only or full cache only costs speed
    try:
        meta = _build(req, tmp)
        if folder is None:
            return Entry(tmp, meta)  # mapped below by the caller; removed at exit
        return Entry(cachedir.publish(tmp, folder), meta)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CnnlabError(f"the disk holding {parent} filled up while decoding: free some space, or set "
                          "CNNLAB_CACHE to a larger disk") from None
    finally:
        if folder is None:
            cachedir.remove_when_mapped(tmp)
        elif tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(folder: Path) -> object | None:
    """An entry's meta.json as written (None: missing or of another version, built again); integrity.py judges
    whether the entry is whole."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"
    if not isinstance(meta, dict):
        return "not an object"  # judged damaged
    return meta if meta.get("version") == CACHE_VERSION else None


# ---------------------------------------------------------------------------------------------------
# Building an entry


def _build(req: Request, tmp: Path) -> dict:
    if req.fmt == "image-folder":
        meta = _build_images(req, tmp)
    else:
        meta = _build_arrays(req, tmp)
    meta["exact_copies"] = _write_digests(tmp, meta)
    meta.update(version=CACHE_VERSION, format=req.fmt, source=str(req.path.resolve()))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def digests(images: np.ndarray) -> np.ndarray:
    """Each image's 64-bit BLAKE2 digest of its pixels (N,) uint64: equal pixels, equal digests, whatever the files'
    formats. Read in chunks through the mapping: 0.35 s for 60,000 CIFAR-sized images (integrity.py)."""
    out = np.empty(len(images), np.uint64)
    for lo in range(0, len(images), 4096):
        chunk = np.ascontiguousarray(images[lo:lo + 4096])
        out[lo:lo + len(chunk)] = [int.from_bytes(hashlib.blake2b(im.data, digest_size=8).digest(), "little")
                                   for im in chunk]
    return out


def _write_digests(tmp: Path, meta: dict) -> dict[str, int]:
    """Write each split's digests; return, per held-out split, how many training images have exactly its
    pixels: the cheap leak count that `train` warns about (`cnnlab data check` finds near copies too)."""
    entry = Entry(tmp, meta)
    found = {}
    for split in entry.splits:
        found[split] = digests(entry.images(split))
        np.save(tmp / f"{split}.digest.npy", found[split])
    meta["label_digests"] = {s: integrity.labels_digest(entry.labels(s)) for s in entry.splits}
    train = found.get("train", np.zeros(0, np.uint64))
    return {s: int(np.isin(train, found[s]).sum()) for s in ("val", "test") if s in found}


def _read_arrays(req: Request):
    if req.fmt == "cifar-python":
        return cifar.read_python(req.path)
    if req.fmt == "cifar-binary":
        return cifar.read_binary(req.path)
    if req.fmt == "cifar100-python":
        return cifar.read_python100(req.path, req.label_mode)
    return idx.read_folder(req.path)


def _build_arrays(req: Request, tmp: Path) -> dict:
    """CIFAR and IDX: already pixels; resized only when --image-size asks for another size."""
    (x, y), (xt, yt), classes = _read_arrays(req)
    classes = _check_labels(req.path, {"training": y, "test": yt}, list(classes))
    size = tuple(req.image_size or x.shape[2:])
    counts, splits = {}, [("train", x, y), ("test", xt, yt)]
    if req.val_split:  # the same stratified pick as Dataset.hold_out, written apart instead of copied in memory
        keep, val = folders.hold_out_indices(y, req.val_split, req.split_seed, len(classes))
        splits = [("train", x[keep], y[keep]), ("val", x[val], y[val]), ("test", xt, yt)]
    _check_room(tmp, sum(len(labels) for _, _, labels in splits), int(x.shape[1]), size)
    for split, images, labels in splits:
        if size != tuple(images.shape[2:]):
            _resize_array(images, size, req.resize, tmp / f"{split}.u8")
        else:
            images.tofile(tmp / f"{split}.u8")
        np.save(tmp / f"{split}.labels.npy", labels.astype(np.int64))
        counts[split] = _counts(labels, len(classes))
    return {"classes": classes, "image_size": list(size), "resize": req.resize if size != x.shape[2:] else None,
            "channels": int(x.shape[1]), "counts": counts, "layout": req.fmt, "split": "official test set",
            "skipped": [], "ignored": {}}


MAX_CLASSES = 100_000  # far beyond any classifier here; a label of 2**40 must not become 2**40 class names


def _check_labels(path: Path, labels: dict[str, np.ndarray], classes: list[str]) -> list[str]:
    """Every label a class index: below the named classes' count, or (files that name none) below MAX_CLASSES.
    Checked here, at load time, not an epoch later; returns the class names, numbered where none are given."""
    limit = len(classes) or MAX_CLASSES
    for split, y in labels.items():
        bad = y[(y < 0) | (y >= limit)]
        if len(bad):
            raise CnnlabError(f"{path}: {split} label {int(bad[0])} is not a class index (0 to {limit - 1})")
    found = max(int(y.max(initial=-1)) for y in labels.values()) + 1
    return classes + [str(i) for i in range(len(classes), found)]


def _resize_array(x: np.ndarray, size: tuple[int, int], resize: Resize, path: Path) -> None:
    """Write `x` resized to `size` into the raw file `path`, through a mapping: never all of it in memory."""
    from PIL import Image

    shape = (len(x), x.shape[1], *size)
    files.allocate(path, int(np.prod(shape)))
    out = np.memmap(path, np.uint8, "r+", shape=shape)
    for i, img in enumerate(x):
        im = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        arr = np.asarray(resize_to(im, size, resize))
        out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    out.flush()
    del out


def _check_room(tmp: Path, n: int, channels: int, size: tuple[int, int]) -> None:
    """Refuse, before decoding anything, an entry the disk cannot hold (CIFAR at --image-size 3000 is 1.6 TB)."""
    need, free = n * channels * size[0] * size[1], shutil.disk_usage(tmp).free
    if need > free:
        raise CnnlabError(f"the decoded images ({n:,} of {size[0]}x{size[1]}) need {need / 1e6:,.0f} MB, and "
                          f"{tmp.parent} has {free / 1e6:,.0f} MB free: choose a smaller --image-size, "
                          "or set CNNLAB_CACHE to a larger disk")


def _counts(labels: np.ndarray, num_classes: int) -> dict:
    return {"total": int(len(labels)), "per_class": np.bincount(labels, minlength=num_classes).tolist()}


def default_size(files: list[str]) -> tuple[int, int]:
    """The input size when none is given: small images keep theirs, larger ones become DEFAULT_IMAGE_SIZE."""
    for f in files[:20]:
        try:
            h, w = image_size(f)
        except (OSError, ValueError, SyntaxError):
            continue  # an unreadable file is reported by the decode itself
        return (h, w) if max(h, w) <= SMALL else (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    return (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)


def _build_images(req: Request, tmp: Path) -> dict:
    listing = folders.list_images(req.path, req.val_fraction, req.split_seed)
    root = folders.files_root(req.path)
    if req.val_split:  # held out before decoding: the validation images are never copied out of the training set
        if "val" in listing.files:
            raise CnnlabError(f"{req.path} has its own validation {'rows' if req.path.is_file() else 'folder'}; "
                              "leave out --val-split")
        listing = listing.hold_out(req.val_split, req.split_seed, into="val")
    size = tuple(req.image_size or default_size(listing.files["train"]))
    splits = [s for s in SPLITS if s in listing.files]
    _check_room(tmp, sum(len(listing.files[s]) for s in splits), 3, size)
    decoded = {s: decode.decode_split(listing.files[s], tmp / f"{s}.u8", size, req.resize, f"decoding {s}")
               for s in splits}
    bad = [msg for s in splits for msg in decoded[s][0].values()]
    if bad and not req.skip_bad:
        _refuse_unreadable(bad)
    gray = all(decoded[s][1] for s in splits)
    files = decode.survey([f for s in splits for f in decoded[s][2] if f is not None])
    counts = {}
    for s in splits:
        errors = decoded[s][0]
        keep = np.array([i for i in range(len(listing.files[s])) if i not in errors], np.int64)
        labels = listing.labels[s][keep]
        _finish_split(tmp / f"{s}.u8", len(listing.files[s]), size, keep, gray)
        _check_not_emptied(s, listing, labels)
        np.save(tmp / f"{s}.labels.npy", labels)
        np.save(tmp / f"{s}.sizes.npy", np.array([decoded[s][2][i]["size"] for i in keep], np.int32).reshape(-1, 2))
        names = [os.path.relpath(listing.files[s][i], root) for i in keep]  # for captions such as top losses
        (tmp / f"{s}.files.json").write_text(json.dumps(names))
        counts[s] = _counts(labels, len(listing.classes))
    return {"classes": listing.classes, "image_size": list(size), "resize": req.resize, "channels": 1 if gray else 3,
            "counts": counts, "layout": listing.layout, "split": listing.split, "skipped": bad,
            "ignored": dict(+listing.ignored), "files": files}


def _refuse_unreadable(bad: list[str]) -> None:
    shown = "; ".join(bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
    raise CnnlabError(f"{len(bad)} unreadable image file(s): {shown}. Fix or remove them, "
                      "or pass --skip-bad-images to leave them out")


def _check_not_emptied(split: str, listing: folders.Listing, labels: np.ndarray) -> None:
    had = set(listing.labels[split].tolist())
    empty = sorted(had - set(labels.tolist()))
    if empty:
        raise CnnlabError(f"no readable images left in {split} for class(es) "
                          f"{', '.join(listing.classes[k] for k in empty)}")


def _finish_split(path: Path, n: int, size: tuple[int, int], keep: np.ndarray, gray: bool) -> None:
    """Close the gaps that unreadable files left, and keep one channel when every image was grey."""
    if len(keep) == n and not gray:
        return
    src = np.memmap(path, np.uint8, "r+", shape=(n, 3, *size)) if n else np.zeros((0, 3, *size), np.uint8)
    channels = 1 if gray else 3
    out_path = path.with_suffix(".tmp")
    if len(keep):
        files.allocate(out_path, len(keep) * channels * size[0] * size[1])
    out = np.memmap(out_path, np.uint8, "r+", shape=(len(keep), channels, *size)) if len(keep) else None
    for lo in range(0, len(keep), 256):
        out[lo:lo + 256] = src[keep[lo:lo + 256], :channels]
    if out is not None:
        out.flush()
        del out
    else:
        out_path.write_bytes(b"")
    del src
    os.replace(out_path, path)
