"""Loading CIFAR-10: first load (decode every image), cached load, and mapped against in-RAM batches.

    .venv/bin/python benchmarks/data_load.py [--data PATH] [--rounds 5]

The first load runs with an empty, temporary cache so it always measures decoding (images/s on this
machine's cores). The cached load maps the decoded files (target: under 2 s; issue "time to result": well
under a second). Then the training hot path, a shuffled epoch of `quick`'s batches (256 images gathered by
random index, then normalized), is timed from the memory-mapped set and from a copy of it in RAM, in
interleaved rounds; the ratio says whether CIFAR-sized data should keep an in-RAM path. Writes
benchmarks/results/data_load.json with the CPU class.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cnnlab import data
from common import DATA, machine, save


def epoch_of_batches(x: torch.Tensor, norm: data.Normalization, batch: int = 256) -> float:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        norm(x[perm[i:i + batch]])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CNNLAB_CACHE"] = cache
        t0 = time.perf_counter()
        ds = data.load_dataset(args.data)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = data.load_dataset(args.data)
        second = time.perf_counter() - t0
        norm = data.Normalization.fit(ds.x_train)
        in_ram = ds.x_train.clone()
        mapped_s, ram_s = [], []
        for _ in range(args.rounds):  # interleaved, so that a change in the machine's speed hits both alike
            mapped_s.append(epoch_of_batches(ds.x_train, norm))
            ram_s.append(epoch_of_batches(in_ram, norm))
    images = len(ds.y_train) + len(ds.y_test)
    result = {"machine": machine(), "data": str(Path(args.data).resolve()), "format": ds.format, "images": images,
              "first_load_s": round(first, 2), "first_load_images_per_s": round(images / first),
              "cached_load_s": round(second, 3), "target_cached_load_s": 1.0,
              "epoch_of_batches_mapped_s": round(statistics.median(mapped_s), 3),
              "epoch_of_batches_in_ram_s": round(statistics.median(ram_s), 3),
              "mapped_over_in_ram": round(statistics.median(mapped_s) / statistics.median(ram_s), 3)}
    print(json.dumps(result, indent=2))
    save("data_load", result)


if __name__ == "__main__":
    main()
