"""`cnnlab data info` in words: format, classes, image size, counts per class and split, the files themselves,
an imbalance, and what was left out, all from an entry's meta.json (no PyTorch, no pixels read)."""

from __future__ import annotations

from collections import Counter

import numpy as np

SPLITS = ("train", "val", "test")

def describe(meta: dict) -> str:
    """Format, classes, image size, counts per class and split, and what was left out, in words."""
    h, w = meta["image_size"]
    c = meta["channels"]
    splits = [s for s in SPLITS if s in meta["counts"]]
    resize = f" ({meta['resize']})" if meta.get("resize") else ""
    lines = [f"source:      {meta['source']}", f"format:      {meta['format']} ({meta.get('layout', meta['format'])})",
             f"image size:  {h}x{w}{resize}, {c} channel{'s' if c > 1 else ''}",
             f"classes:     {len(meta['classes'])}", f"test split:  {meta['split']}"]
    if "val" in splits:
        lines.append("validation:  val/ folder")
    width = max(len("class"), *(len(k) for k in meta["classes"]))
    lines += ["", f"{'class':<{width}}" + "".join(f"  {s:>7}" for s in splits)]
    for k, name in enumerate(meta["classes"]):
        lines.append(f"{name:<{width}}" + "".join(f"  {meta['counts'][s]['per_class'][k]:>7}" for s in splits))
    lines.append(f"{'total':<{width}}" + "".join(f"  {meta['counts'][s]['total']:>7}" for s in splits))
    lines += _describe_files(meta.get("files") or {}) + _imbalance(meta)
    ignored = Counter(meta.get("ignored") or {})
    if ignored:
        lines.append("\nignored:     " + ", ".join(f"{n} {why} file(s)" for why, n in sorted(ignored.items())))
    skipped = meta.get("skipped") or []
    if skipped:
        lines.append(f"skipped:     {len(skipped)} unreadable file(s) (--skip-bad-images):")
        lines += [f"  {s}" for s in skipped]
    return "\n".join(lines)


def _describe_files(files: dict) -> list[str]:
    """The files as they are on disk (image folders and CSVs: recorded when they were decoded)."""
    if not files:
        return []
    (w0, wm, w1), (h0, hm, h1) = files["width"], files["height"]
    lines = ["", "files:       " + ", ".join(f"{n:,} {fmt}" for fmt, n in files["formats"].items()),
             f"file sizes:  width {w0}-{w1} px (median {wm}), height {h0}-{h1} px (median {hm}), as shown"]
    if files["exif_rotated"]:
        lines.append(f"EXIF:        {files['exif_rotated']:,} photo(s) turned or mirrored upright by their EXIF "
                     "orientation, as a viewer shows them")
    if files["transparent"]:
        lines.append(f"alpha:       {files['transparent']:,} image(s) with transparency, shown over white")
    return lines


IMBALANCE = 1.5  # the largest class over the smallest, in training images, from which data info says so


def _imbalance(meta: dict) -> list[str]:
    per_class = meta["counts"]["train"]["per_class"] if "train" in meta["counts"] else []
    if not per_class or min(per_class) == 0 or max(per_class) / min(per_class) < IMBALANCE:
        return []
    big, small = int(np.argmax(per_class)), int(np.argmin(per_class))
    return ["", f"imbalance:   the largest class has {max(per_class) / min(per_class):.1f}x the training images "
                f"of the smallest ({meta['classes'][big]} {per_class[big]:,}, {meta['classes'][small]} "
                f"{per_class[small]:,}); --class-weights auto weights each class's loss by its rarity"]
