"""`cnnlab data check`: what is wrong with a data set itself, found before anything trains on it.

Everything is read from the decoded cache (cache.py), so a checked folder is not decoded again to train:
- **exact duplicates**: images with the same pixels whatever their files' formats (the digests the cache wrote
  when it decoded them);
- **near duplicates**: resized, recompressed, slightly cropped or colour-shifted copies, by perceptual hash
  (imagehash's DCT hash of the decoded pixels) within NEAR_BITS of 64 bits;
- **leaks**: each training image that is a (near) copy of a validation or test image, paired with it;
- **conflicts**: one (near-)identical image under two or more classes;
- unreadable files, images much smaller than the input size, extreme aspect ratios, grey images in a colour
  set, and class imbalance.
Findings are not errors: the command exits 0 (1 under --strict with leaks or conflicts). Likely label errors
need trained models and live above the training layer (cnnlab/labels.py); they join these findings there.
No PyTorch here: numpy, Pillow and imagehash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cnnlab.data import cache
from cnnlab.errors import CnnlabError

# Measured on 2,000 CIFAR-10 test images (JPEG copy; every fifth) and copies of 200 of them resized to 40 px,
# saved at JPEG quality 60 and resized back: a copy lies 0-4 bits from its original (median 0, 95th percentile
# 2); of the 1,999,000 pairs of distinct images, 0 lie within 4 bits, 2 within 6 (CIFAR's own near copies), 4
# within 8, 29 within 12; half of the images have no other image within 18 bits. 6 bits leaves room for
# crops and colour shifts (tests/test_data_check.py) at almost no false match.
NEAR_BITS = 6
TINY = 0.5  # an image file whose shorter side is below half the input's is blown up more than 2x to train
ASPECT = 3.0  # longer side over shorter: past 3:1, a centre crop throws away two thirds of the image
GREY_SPREAD = 8  # the largest difference between colour channels of an image still called grey (JPEG's noise)
IMBALANCE = 1.5  # the largest class over the smallest (training images), as `data info` says it
HELD_OUT = ("val", "test")


@dataclass
class Findings:
    """What `check` found; every image named by `ref` as {"split", "index", "file", "label"}."""

    source: str
    classes: list[str]
    counts: dict[str, int]
    duplicates: list[dict] = field(default_factory=list)  # {"exact": bool, "images": [ref, ...]}
    leaks: list[dict] = field(default_factory=list)  # {"train": ref, "held_out": ref, "exact": bool, "bits": d}
    conflicts: list[dict] = field(default_factory=list)  # {"classes": [...], "images": [ref, ...]}
    unreadable: list[str] = field(default_factory=list)
    tiny: list[dict] = field(default_factory=list)  # ref + "size": [w, h]
    aspect: list[dict] = field(default_factory=list)
    grey: list[dict] = field(default_factory=list)
    imbalance: dict | None = None
    label_suspects: list[dict] = field(default_factory=list)  # labels.py: ref + "suggested", "quality"
    labels_checked: bool = False  # whether --labels ranked them (none found means something only then)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @property
    def serious(self) -> bool:
        """What --strict fails on: a test score that copies inflate, or one image taught as two classes."""
        return bool(self.leaks or self.conflicts)


class Images:
    """All splits of a cache entry as one numbered list: pixels, labels, digests, names."""

    def __init__(self, entry: cache.Entry):
        self.entry, self.splits = entry, entry.splits
        self.split = np.concatenate([np.full(entry.meta["counts"][s]["total"], k) for k, s in enumerate(self.splits)])
        self.row = np.concatenate([np.arange(entry.meta["counts"][s]["total"]) for s in self.splits])
        self.labels = np.concatenate([entry.labels(s) for s in self.splits])
        self.digests = np.concatenate([entry.digests(s) for s in self.splits])
        self.files = {s: entry.files(s) for s in self.splits}
        self.classes = entry.meta["classes"]

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, split: str) -> np.ndarray:
        return self.entry.images(split)

    def ref(self, i: int) -> dict:
        s, r = self.splits[self.split[i]], int(self.row[i])
        files = self.files[s]
        return {"split": s, "index": r, "file": files[r] if files else None,
                "label": self.classes[self.labels[i]]}

    def held_out(self, i: int) -> bool:
        return self.splits[self.split[i]] in HELD_OUT


def check(entry: cache.Entry, near_bits: int = NEAR_BITS) -> Findings:
    """Every finding of the module docstring for one cache entry."""
    if not 0 <= near_bits <= 32:
        raise CnnlabError(f"--near must be between 0 and 32 bits of 64, got {near_bits}")
    im = Images(entry)
    meta = entry.meta
    found = Findings(meta["source"], im.classes, {s: meta["counts"][s]["total"] for s in im.splits},
                     unreadable=list(meta["skipped"]))
    reps, members = _exact_groups(im.digests)
    hashes = perceptual_hashes(im, reps)
    edges = near_pairs(hashes, near_bits)
    groups = copy_groups(reps, members, edges)
    found.duplicates = [{"exact": exact, "images": [im.ref(i) for i in images]} for images, exact in groups]
    _leaks(found, im, members, edges)
    _conflicts(found, im, groups)
    _files(found, im, meta)
    found.imbalance = imbalance(meta)
    return found


# ---------------------------------------------------------------------------------------------------
# Copies


def _exact_groups(digests: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """One representative per distinct pixel content, and the images that share each one's pixels."""
    order = np.argsort(digests, kind="stable")
    starts = np.flatnonzero(np.r_[True, digests[order][1:] != digests[order][:-1]])
    members = np.split(order, starts[1:])
    return np.array([m[0] for m in members], np.int64), members


def perceptual_hashes(im: Images, which: np.ndarray) -> np.ndarray:
    """imagehash's DCT hash (phash, 8x8 bits) of the decoded pixels of images `which`, packed as uint64."""
    import imagehash
    from PIL import Image

    out = np.empty(len(which), np.uint64)
    bounds = np.cumsum([0] + [len(im.entry.labels(s)) for s in im.splits])
    for k, s in enumerate(im.splits):
        pick = np.flatnonzero((which >= bounds[k]) & (which < bounds[k + 1]))
        x = im.pixels(s)
        for j in pick:
            a = x[which[j] - bounds[k]]
            pil = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
            bits = imagehash.phash(pil).hash.flatten()
            out[j] = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return out


def near_pairs(hashes: np.ndarray, bits: int) -> np.ndarray:
    """Pairs (i, j, distance), i < j, of hashes at most `bits` apart. Split into bits + 1 blocks, two hashes that
    close agree on at least one whole block, so only hashes sharing a block value are compared (pigeonhole)."""
    if len(hashes) < 2:
        return np.zeros((0, 3), np.int64)
    blocks = np.array_split(np.arange(64), bits + 1)
    found = []
    for b in blocks:
        mask = np.uint64(sum(1 << int(k) for k in b))
        key = hashes & mask
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1], True])
        for lo, hi in zip(starts[:-1], starts[1:], strict=True):
            if hi - lo > 1:
                found.append(_close_within(order[lo:hi], hashes, bits))
    if not found:
        return np.zeros((0, 3), np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs


def _close_within(idx: np.ndarray, hashes: np.ndarray, bits: int) -> np.ndarray:
    out = []
    for lo in range(0, len(idx), 1024):  # a bucket of thousands (blank images) compared in slices
        a = idx[lo:lo + 1024]
        d = np.bitwise_count(hashes[a][:, None] ^ hashes[idx][None, :]).astype(np.int64)
        i, j = np.nonzero((d <= bits) & (a[:, None] < idx[None, :]))
        out.append(np.stack([a[i], idx[j], d[i, j]], 1))
    return np.concatenate(out) if out else np.zeros((0, 3), np.int64)


def _groups(n: int, edges: np.ndarray) -> list[np.ndarray]:
    """Connected components (union-find) of representatives 0..n-1 joined by `edges`, those of 2 or more."""
    parent = np.arange(n)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for a, b, _ in edges:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(a) for a in range(n)])
    order = np.argsort(roots, kind="stable")
    starts = np.flatnonzero(np.r_[True, roots[order][1:] != roots[order][:-1]])
    return [g for g in np.split(order, starts[1:]) if len(g) > 1]


def copy_groups(reps, members, edges) -> list[tuple[np.ndarray, bool]]:
    """(images, exact) of every group of copies, largest first: near groups (which hold their exact copies), then
    the exact copies no near copy joins."""
    near = _groups(len(reps), edges)
    joined = {int(r) for g in near for r in g}
    groups = [(np.concatenate([members[r] for r in g]), False) for g in near]
    groups += [(m, True) for r, m in enumerate(members) if len(m) > 1 and r not in joined]
    return sorted(groups, key=lambda g: -len(g[0]))


def _leaks(found: Findings, im: Images, members, edges) -> None:
    """Each training image with a copy among the held-out images, paired with the nearest such copy."""
    neighbours: dict[int, list[tuple[int, int]]] = {}
    for a, b, d in edges:
        neighbours.setdefault(int(a), []).append((int(d), int(b)))
        neighbours.setdefault(int(b), []).append((int(d), int(a)))
    for r, m in enumerate(members):
        train = [i for i in m if not im.held_out(i)]
        if not train:
            continue
        candidates = [(0, True, i) for i in m if im.held_out(i)]
        candidates += [(d, False, i) for d, o in sorted(neighbours.get(r, [])) for i in members[o] if im.held_out(i)]
        if candidates:
            d, exact, partner = candidates[0]
            found.leaks += [{"train": im.ref(i), "held_out": im.ref(partner), "exact": exact, "bits": d}
                            for i in train]


def _conflicts(found: Findings, im: Images, groups) -> None:
    """Groups of (near-)identical images filed under more than one class."""
    for images, _ in groups:
        labels = sorted(set(im.labels[images].tolist()))
        if len(labels) > 1:
            found.conflicts.append({"classes": [im.classes[k] for k in labels],
                                    "images": [im.ref(i) for i in images]})


# ---------------------------------------------------------------------------------------------------
# The files and the classes


def _files(found: Findings, im: Images, meta: dict) -> None:
    side = min(meta["image_size"])
    offset = 0
    for s in im.splits:
        sizes = im.entry.sizes(s)
        n = meta["counts"][s]["total"]
        if sizes is not None and len(sizes):
            short, long = sizes.min(1), sizes.max(1)
            for r in np.flatnonzero(short < side * TINY):
                found.tiny.append({**im.ref(offset + r), "size": sizes[r].tolist()})
            for r in np.flatnonzero(long > ASPECT * np.maximum(short, 1)):
                found.aspect.append({**im.ref(offset + r), "size": sizes[r].tolist()})
        if meta["channels"] == 3:
            for r in np.flatnonzero(_grey(im.pixels(s))):
                found.grey.append(im.ref(offset + r))
        offset += n


def _grey(x: np.ndarray) -> np.ndarray:
    """Which images of a colour set have (nearly) equal channels everywhere."""
    out = np.zeros(len(x), bool)
    for lo in range(0, len(x), 1024):
        c = x[lo:lo + 1024].astype(np.int16)
        spread = np.maximum(np.abs(c[:, 0] - c[:, 1]), np.abs(c[:, 1] - c[:, 2])).reshape(len(c), -1).max(1)
        out[lo:lo + len(c)] = spread <= GREY_SPREAD
    return out


def imbalance(meta: dict) -> dict | None:
    per_class = meta["counts"].get("train", {}).get("per_class", [])
    if not per_class or max(per_class) < IMBALANCE * max(min(per_class), 1):
        return None
    big, small = int(np.argmax(per_class)), int(np.argmin(per_class))
    return {"largest": meta["classes"][big], "largest_count": per_class[big], "smallest": meta["classes"][small],
            "smallest_count": per_class[small], "ratio": round(per_class[big] / max(per_class[small], 1), 2),
            "hint": "--class-weights auto weights each class's loss by its rarity"}


# ---------------------------------------------------------------------------------------------------
# In words


def summary(found: Findings) -> str:
    """One screen: a line per kind of finding, with what to do about the serious ones."""
    total = sum(found.counts.values())
    splits = ", ".join(f"{s} {n:,}" for s, n in found.counts.items())
    lines = [f"checked {total:,} images of {len(found.classes)} classes ({splits}) from {found.source}"]
    exact = sum(leak["exact"] for leak in found.leaks)
    held = sorted({leak["held_out"]["split"] for leak in found.leaks})
    rows = [
        ("leaks", found.leaks, f"{len(found.leaks):,} training image(s) are copies of {'/'.join(held)} images "
         f"({exact:,} exact): the held-out score flatters the model; remove them from training"),
        ("conflicts", found.conflicts, f"{len(found.conflicts):,} image(s) filed under two or more classes "
         f"({sum(len(c['images']) for c in found.conflicts):,} files)"),
        ("duplicates", found.duplicates, f"{len(found.duplicates):,} group(s) of copies, "
         f"{sum(len(d['images']) for d in found.duplicates):,} images "
         f"({sum(d['exact'] for d in found.duplicates):,} groups of identical pixels)"),
        ("label errors", found.label_suspects, f"{len(found.label_suspects):,} image(s) whose label the "
         "out-of-fold models doubt (most doubted first in --json / --html)"),
        ("unreadable", found.unreadable, f"{len(found.unreadable):,} file(s) that cannot be decoded"),
        ("tiny", found.tiny, f"{len(found.tiny):,} image(s) under half the input size, blown up to train"),
        ("aspect", found.aspect, f"{len(found.aspect):,} image(s) more than {ASPECT:g}:1, mostly cropped away"),
        ("grey", found.grey, f"{len(found.grey):,} grey image(s) in a colour set"),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    lines += [f"{name + ':':<{width}}{text}" for name, items, text in rows if items]
    if found.imbalance:
        b = found.imbalance
        lines.append(f"{'imbalance:':<{width}}{b['ratio']}x: {b['largest']} {b['largest_count']:,}, {b['smallest']} "
                     f"{b['smallest_count']:,} training images; {b['hint']}")
    if len(lines) == 1:
        lines.append("no copies, leaks, conflicts or unusual files found")
    if found.labels_checked and not found.label_suspects:
        lines.append(f"{'label errors:':<{width}}none likely: the out-of-fold models agree with the labels")
    return "\n".join(lines)
