"""How long loading CIFAR-10 takes: first load (decode every image) and second load (from the cache).

    .venv/bin/python benchmarks/data_load.py [--data PATH]

Prints the figures and writes benchmarks/results/data_load.json. The first load runs with an empty,
temporary cache so it always measures decoding; the target for the second load is under 2 seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from cnnlab import data, files

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(HERE.parent / ".." / "shared" / "data" / "cifar10-jpeg"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CNNLAB_CACHE"] = cache
        t0 = time.perf_counter()
        ds = data.load_dataset(args.data)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        data.load_dataset(args.data)
        second = time.perf_counter() - t0
    result = {"data": str(Path(args.data).resolve()), "format": ds.format,
              "images": len(ds.y_train) + len(ds.y_test), "first_load_s": round(first, 2),
              "cached_load_s": round(second, 2), "target_cached_load_s": 2.0, "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    files.write_json(HERE / "results" / "data_load.json", result)


if __name__ == "__main__":
    main()
