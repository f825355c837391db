"""How well `cnnlab data check` finds planted faults in real images, and how long each check takes.

    .venv/bin/python benchmarks/data_check.py [--train-per-class 1000] [--test-per-class 200] [--folds 5]

A CIFAR-10 (JPEG copy) subset is copied into a folder and checked as it is (CIFAR holds copies of its own,
which are not counted against the check). Then faults are planted as the issue describes:
- 200 test images copied into training, in their own class: 100 as PNG (the same pixels in another format),
  100 resized to 40 px and saved at JPEG quality 60;
- 50 training images copied into a second class (conflicts);
- 5% of the remaining training images moved to another class (flipped labels).
Leaks: precision and recall of the planted (training copy, test original) pairs among the leaks that are new
after planting. Conflicts: of the planted pairs among the new conflict groups. Label errors: out-of-fold
probabilities (labels.py), the training images ranked by cleanlab's label quality; precision of the top 5%
(the share of them that were flipped; 5% were flipped, so chance is 5%), and cleanlab's own flagged set.
Times: decoding into the cache, the copy check and the label check, each per 10,000 images.
Writes benchmarks/results/data_check.json.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab import data, labels
from cnnlab.config import DataConfig
from cnnlab.data import cache, check
from common import DATA, cpu_class, machine, save


def copy_subset(root: Path, per_class: dict[str, int]) -> list[str]:
    classes = sorted(p.name for p in (DATA / "train").iterdir())
    for split, n in per_class.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((DATA / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    return classes


def plant(root: Path, classes: list[str], rng) -> dict:
    tests = sorted((root / "test").glob("*/*.jpg"))
    leaks = {}
    for i, f in enumerate(rng.choice(tests, 200, replace=False)):
        im = Image.open(f)
        if i < 100:
            name = f"train/{f.parent.name}/leak{i}.png"
            im.save(root / name)
        else:
            name = f"train/{f.parent.name}/leak{i}.jpg"
            im.resize((40, 40), Image.BICUBIC).save(root / name, quality=60)
        leaks[name] = f"test/{f.parent.name}/{f.name}"
    train = sorted((root / "train").glob("*/[0-9]*.jpg"))
    picked = rng.choice(len(train), 50 + len(train) // 20, replace=False)
    conflicts, flipped = {}, set()
    for k, i in enumerate(picked):
        f = train[i]
        other = classes[(classes.index(f.parent.name) + rng.integers(1, len(classes))) % len(classes)]
        if k < 50:
            name = f"train/{other}/twice{k}.jpg"
            shutil.copy(f, root / name)
            conflicts[name] = f"train/{f.parent.name}/{f.name}"
        else:
            name = f"train/{other}/flipped-{f.parent.name}-{f.name}"  # CIFAR's file names repeat across classes
            f.rename(root / name)
            flipped.add(name)
    return {"leaks": leaks, "conflicts": conflicts, "flipped": flipped}


def run_check(root: Path) -> tuple[check.Findings, cache.Entry, dict]:
    t = time.perf_counter()
    entry = cache.entry_for(DataConfig(path=str(root), skip_bad_images=True))
    decoded = time.perf_counter() - t
    t = time.perf_counter()
    found = check.check(entry)
    return found, entry, {"decode_s": decoded, "check_s": time.perf_counter() - t}


def score(before: check.Findings, after: check.Findings, planted: dict) -> dict:
    old = {(x["train"]["file"], x["held_out"]["file"]) for x in before.leaks}
    new = {(x["train"]["file"], x["held_out"]["file"]) for x in after.leaks} - old
    hits = sum(planted["leaks"].get(t) == h for t, h in new)
    old_groups = {frozenset(r["file"] for r in c["images"]) for c in before.conflicts}
    new_groups = [frozenset(r["file"] for r in c["images"]) for c in after.conflicts]
    new_groups = [g for g in new_groups if g not in old_groups]
    found_pairs = sum(any({a, b} <= g for g in new_groups) for a, b in planted["conflicts"].items())
    true_groups = sum(any({a, b} <= g for a, b in planted["conflicts"].items()) for g in new_groups)
    return {"leaks": {"planted": len(planted["leaks"]), "new_found": len(new), "true": hits,
                      "precision": hits / max(len(new), 1), "recall": hits / len(planted["leaks"]),
                      "already_in_the_subset": len(old)},
            "conflicts": {"planted": len(planted["conflicts"]), "new_groups": len(new_groups),
                          "precision": true_groups / max(len(new_groups), 1),
                          "recall": found_pairs / len(planted["conflicts"]),
                          "already_in_the_subset": len(old_groups)}}


def label_scores(entry: cache.Entry, root: Path, flipped: set[str], folds: int) -> dict:
    ds = data.load(DataConfig(path=str(root), skip_bad_images=True))
    t = time.perf_counter()
    probs = labels.out_of_fold_probabilities(ds, folds)
    seconds = time.perf_counter() - t
    y = entry.labels("train")
    flagged, quality = labels.rank(y, probs["train"])
    files = entry.files("train")
    is_flipped = np.array([f in flipped for f in files])
    top = np.argsort(quality, kind="stable")[:int(0.05 * len(y))]
    return {"flipped": int(is_flipped.sum()), "train_images": len(y), "folds": folds, "seconds": seconds,
            "top5pct_precision": float(is_flipped[top].mean()),
            "top5pct_recall": float(is_flipped[top].sum() / max(is_flipped.sum(), 1)),
            "flagged": len(flagged), "flagged_precision": float(is_flipped[flagged].mean()) if len(flagged) else 0.0,
            "flagged_recall": float(is_flipped[flagged].sum() / max(is_flipped.sum(), 1)),
            "out_of_fold_accuracy": float((probs["train"].argmax(1) == y).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="data-check-") as tmp:
        root = Path(tmp) / "cifar-subset"
        classes = copy_subset(root, {"train": args.train_per_class, "test": args.test_per_class})
        before, _, _ = run_check(root)
        planted = plant(root, classes, np.random.default_rng(args.seed))
        after, entry, times = run_check(root)
        n = sum(after.counts.values())
        result = {"machine": machine(), "cpu_class": cpu_class(), "images": after.counts,
                  "near_bits": check.NEAR_BITS, **score(before, after, planted),
                  "labels": label_scores(entry, root, planted["flipped"], args.folds)}
        result["seconds_per_10k_images"] = {"decode": times["decode_s"] * 1e4 / n, "copies": times["check_s"] * 1e4 / n,
                                            "labels": result["labels"]["seconds"] * 1e4 / n}
    for k in ("leaks", "conflicts", "labels", "seconds_per_10k_images"):
        print(k, {a: round(b, 3) if isinstance(b, float) else b for a, b in result[k].items()})
    print("wrote", save("data_check", result))


if __name__ == "__main__":
    main()
