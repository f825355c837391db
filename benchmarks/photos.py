"""Photo folders larger than memory: first decode, cached load, peak anonymous memory, training speed, accuracy.

    .venv/bin/python benchmarks/photos.py [--sizes 5000 20000] [--epochs 1] [--image-size 96]
    .venv/bin/python benchmarks/photos.py --sweep 96 128 160 [--sweep-epochs 8]   # choosing the default size

Generates a photo-like folder from CIFAR-10 (real pixels upscaled to 200-640 px with aspect ratios 4:3, 3:4
and 1:1, saved as JPEG; a stratified pick of N training images and 2,000 test images) once per N under
~/.cache/cnnlab-bench/, then for each N measures:
- the first decode (`cnnlab data info` with an empty cache), as images/s;
- the cached load (`cnnlab data info` again, and `data.load_dataset` in this process);
- `cnnlab train --preset photos --epochs 1`: peak *anonymous* memory (RssAnon in /proc/PID/status, polled
  every 50 ms: the page cache of the memory-mapped images is not the process' own memory), training
  images/s and test accuracy.
Targets (issue "your own photos"): peak anonymous memory at N = 20,000 within 15% of N = 5,000; first decode
at least 600 images/s on 2 cores. Writes benchmarks/results/photos.json with the CPU class.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab import data
from cnnlab.data import folders
from common import CNNLAB, DATA, ROOT, machine, save

WORK = Path.home() / ".cache" / "cnnlab-bench"
SHAPES = ((4, 3), (3, 4), (1, 1))  # width : height


def _write_photo(task: tuple[str, str, int]) -> None:
    src, dest, seed = task
    rng = np.random.default_rng(seed)
    aw, ah = SHAPES[rng.integers(len(SHAPES))]
    long_side = int(rng.integers(200, 641))
    w, h = (long_side, long_side * ah // aw) if aw >= ah else (long_side * aw // ah, long_side)
    with Image.open(src) as im:
        im.convert("RGB").resize((w, h), Image.BICUBIC).save(dest, quality=90)


def make_folder(n_train: int, n_test: int = 2000) -> Path:
    """ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg, made once and reused."""
    root = WORK / f"photos-{n_train}-{n_test}"
    if (root / ".complete").exists():
        return root
    tasks = []
    listing = folders.list_images(DATA)
    for split, n in (("train", n_train), ("test", n_test)):
        files, labels = listing.files[split], listing.labels[split]
        for i in folders.stratified_pick(labels, n, 0, len(listing.classes)):
            dest = root / split / listing.classes[labels[i]] / f"{i:05d}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            tasks.append((files[i], str(dest), int(i)))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_photo, tasks, chunksize=64))
    (root / ".complete").touch()
    return root


def peak_anon_mb(cmd: list[str], env: dict, log: Path) -> tuple[float, float, int]:
    """Run `cmd`; return (wall seconds, peak RssAnon in MB, exit code), polling /proc every 50 ms."""
    t0, peak = time.perf_counter(), 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.05)
    return time.perf_counter() - t0, peak / 1024, proc.returncode


def measure(n: int, epochs: int, image_size: str, out: Path) -> dict:
    folder = make_folder(n)
    cache = Path(tempfile.mkdtemp(prefix="photos-cache-"))
    env = {**os.environ, "CNNLAB_CACHE": str(cache)}
    images = sum(1 for _ in folder.rglob("*.jpg"))
    info = [*CNNLAB, "data", "info", "--data", str(folder), "--image-size", image_size]
    t0 = time.perf_counter()
    subprocess.run(info, cwd=ROOT, env=env, check=True, capture_output=True)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(info, cwd=ROOT, env=env, check=True, capture_output=True)
    cached_cmd = time.perf_counter() - t0
    os.environ["CNNLAB_CACHE"] = str(cache)
    t0 = time.perf_counter()
    ds = data.load_dataset(folder, image_size=tuple(int(v) for v in image_size.split("x")) if "x" in image_size
                           else (int(image_size),) * 2)
    load_s = time.perf_counter() - t0
    run = out / f"photos-{n}"
    cmd = [*CNNLAB, "train", "--preset", "photos", "--epochs", str(epochs), "--data", str(folder),
           "--image-size", image_size, "--out", str(run)]
    wall, peak, code = peak_anon_mb(cmd, env, out / f"photos-{n}.log")
    if code != 0:
        raise SystemExit(f"training failed (exit {code}); see {out / f'photos-{n}.log'}")
    history = json.loads((run / "history.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    train_s = sum(h["seconds"] for h in history)
    result = {"train_images": len(ds.y_train), "test_images": len(ds.y_test), "image_size": list(ds.image_size),
              "first_decode_images_per_s": round(images / first, 1), "first_decode_seconds": round(first, 2),
              "cached_data_info_seconds": round(cached_cmd, 2), "cached_load_seconds": round(load_s, 3),
              "train_wall_seconds": round(wall, 1), "peak_anon_mb": round(peak, 1),
              "train_images_per_s": round(len(ds.y_train) * epochs / train_s, 1), "epochs": epochs,
              "test_accuracy": metrics["test_accuracy"]}
    print(json.dumps({n: result}))
    return result


def sweep(n: int, sizes: list[int], epochs: int, out: Path) -> dict:
    """The `photos` preset at each input size on the N-image folder: accuracy, training seconds, and accuracy
    per CPU-minute (training seconds x cores), for choosing the default size."""
    folder, results = make_folder(n), {}
    for size in sizes:
        run = out / f"sweep-{size}"
        subprocess.run([*CNNLAB, "train", "--preset", "photos", "--epochs", str(epochs), "--data", str(folder),
                        "--image-size", str(size), "--out", str(run), "--no-report"], cwd=ROOT, check=True,
                       capture_output=True)
        train_s = sum(h["seconds"] for h in json.loads((run / "history.json").read_text()))
        accuracy = json.loads((run / "metrics.json").read_text())["test_accuracy"]
        results[str(size)] = {"test_accuracy": accuracy, "train_seconds": round(train_s, 1),
                              "accuracy_per_cpu_minute": round(accuracy / (train_s * os.cpu_count() / 60), 4)}
        print(json.dumps({size: results[str(size)]}))
    return {"train_images": n, "epochs": epochs, "sizes": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", default="96")
    parser.add_argument("--sweep", type=int, nargs="*", metavar="SIZE",
                        help="only train the photos preset at these sizes on the smallest N (default-size choice)")
    parser.add_argument("--sweep-epochs", type=int, default=8)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="photos-bench-"))
    if args.sweep:
        save("photos_size", {"machine": machine(), **sweep(min(args.sizes), args.sweep, args.sweep_epochs, out)})
        return
    results = {str(n): measure(n, args.epochs, args.image_size, out) for n in args.sizes}
    summary = {"machine": machine(), "command": "cnnlab train --preset photos --epochs "
               f"{args.epochs} --image-size {args.image_size}", "results": results}
    if len(args.sizes) >= 2:
        lo, hi = results[str(min(args.sizes))], results[str(max(args.sizes))]
        summary["anon_memory_growth"] = round(hi["peak_anon_mb"] / lo["peak_anon_mb"] - 1, 3)
        summary["targets"] = {"anon_growth_within_15_percent": summary["anon_memory_growth"] <= 0.15,
                              "first_decode_600_per_s": all(r["first_decode_images_per_s"] >= 600
                                                            for r in results.values())}
    print(json.dumps(summary, indent=1))
    save("photos", summary)


if __name__ == "__main__":
    main()
