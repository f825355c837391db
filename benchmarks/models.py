"""Test accuracy and training time of every registered model on CIFAR-10 (JPEG copy), one short schedule.

The schedule is the `standard` preset (SGD with Nesterov momentum, one-cycle learning rate, flips and
2-pixel shifts, label smoothing 0.1, mirror test-time augmentation) shortened to a few epochs on a
stratified subset, so that the whole table fits in a quarter of an hour on a 2-core CPU. The figures
compare architectures under the same small budget; they are not the networks' converged accuracies.

    python benchmarks/models.py [--epochs 3] [--subset 10000] [--models resnet20 vgg11_bn ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from cnnlab import models
from common import HERE, machine, save, train_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--subset", type=int, default=10_000, help="training images (stratified); the test set is whole")
    ap.add_argument("--models", nargs="+", default=sorted(models.MODELS))
    args = ap.parse_args()
    rows = []
    for name in args.models:
        out = HERE / "work" / "models" / f"{name}-e{args.epochs}-n{args.subset}"
        shutil.rmtree(out, ignore_errors=True)
        result = train_run("standard", out, "--model", name, "--epochs", str(args.epochs), "--subset",
                           str(args.subset), "--no-report")
        params = json.loads((out / "model.json").read_text())["params"]
        row = {"model": name, "params": params, "test_accuracy": result["test_accuracy"],
               "train_seconds": result["train_seconds"],
               "seconds_per_epoch": round(result["train_seconds"] / args.epochs, 1),
               "images_per_s": round(sum(h["images_per_s"] for h in result["history"]) / len(result["history"]), 1),
               "peak_rss_mb": result["peak_rss_mb"]}
        rows.append(row)
        print(f"{name:<12} {params:>11,} params  {row['test_accuracy']:.2%}  {row['train_seconds']:>7.1f} s  "
              f"({row['images_per_s']:,.0f} img/s)", flush=True)
    save("models", {"machine": machine(), "schedule": {"preset": "standard", "epochs": args.epochs,
                                                       "subset": args.subset},
                    "command": "python benchmarks/models.py " + " ".join(sys.argv[1:]), "rows": rows})


if __name__ == "__main__":
    main()
