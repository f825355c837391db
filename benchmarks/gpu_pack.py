"""The CIFAR-10 JPEG copy, or a subset of it, packed to travel to a GPU machine for gpu_check.py (the device
tool carries 64 MiB in all):

    python benchmarks/gpu_pack.py                        # all 50,000 training and 10,000 test JPEGs: 19.3 MiB
    python benchmarks/gpu_pack.py --train 1000 --test 200 --out DIR

Takes the first images of each class, by file name, from the shared copy: the same images on every machine, so
the CPU reference (`gpu_check.py --device cpu`) and the GPU run train on the same data. Writes the folder
(`train/<class>/`, `test/<class>/`) and beside it one gzipped tar of it, which travels as one file (tar pads each
file of ~900 bytes to 1.5 KiB, which gzip takes out with the JPEG headers they share: 60,000 files in 19.3 MiB);
the GPU machine unpacks it with `tar -xzf`. Nothing from the shared data is committed: benchmarks/work/, the
default place, is ignored by git.
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path

from common import DATA, HERE

LIMIT_MIB = 48  # the tar's largest size: the device tool carries 64 MiB in all, the working tree included


def make(source: Path, out: Path, counts: dict[str, int]) -> Path:
    """`out` filled with the first counts[split] // 10 images of each class of each split of `source`."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n in counts.items():
        classes = sorted(p.name for p in (source / split).iterdir() if p.is_dir())
        for c in classes:
            (tmp / split / c).mkdir(parents=True)
            for f in sorted((source / split / c).glob("*.jpg"))[: n // len(classes)]:
                shutil.copyfile(f, tmp / split / c / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DATA, help="the CIFAR-10 JPEG copy (default: the shared one)")
    ap.add_argument("--train", type=int, default=50_000, help="training images, equal per class (default: all)")
    ap.add_argument("--test", type=int, default=10_000, help="test images, equal per class (default: all)")
    ap.add_argument("--out", type=Path, help="the folder (default: benchmarks/work/cifar10-TRAIN-TEST)")
    args = ap.parse_args()
    out = args.out or HERE / "work" / f"cifar10-{args.train}-{args.test}"
    out.parent.mkdir(parents=True, exist_ok=True)
    make(args.source, out, {"train": args.train, "test": args.test})
    archive = out.with_name(out.name + ".tar.gz")
    with tarfile.open(archive.with_name(archive.name + ".tmp"), "w:gz") as tar:
        tar.add(out, arcname=out.name)
    archive.with_name(archive.name + ".tmp").rename(archive)
    mib = archive.stat().st_size / 2**20
    print(f"{out}\n{archive}: {mib:.1f} MiB")
    if mib > LIMIT_MIB:
        raise SystemExit(f"{archive} is {mib:.0f} MiB, over {LIMIT_MIB}: take fewer images (--train, --test)")


if __name__ == "__main__":
    main()
