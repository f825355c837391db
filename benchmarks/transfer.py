"""Does transfer work? Pre-train on half of CIFAR-10, fine-tune on a few images of the other half.

1. Pre-train resnet18_imagenet (the `standard` recipe) on CIFAR-10 classes 0-4 (airplane .. deer, 25,000
   images), and save its weights without the head as a plain .safetensors file.
2. On 100 training images per class of classes 5-9 (dog .. truck), tested on their 5,000 test images, train
   the same network three ways with the same epochs:
     fine-tune  --preset finetune --model resnet18_imagenet --pretrained FILE   (a frozen epoch, then all)
     scratch    the same recipe from random weights   (no frozen phase: the body has nothing to keep)
     head-only  --preset finetune --pretrained FILE --head-only   (a linear probe on cached embeddings)
   and print test accuracy and wall-clock seconds of each.

The images stay 32x32 (CIFAR's size); every run normalizes with its training images' statistics. Writes
benchmarks/results/transfer.json. Run alone: the seconds are wall clock.

    python benchmarks/transfer.py [--pretrain-epochs 15] [--epochs 10] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

from safetensors.torch import load_file, save_file

from common import CNNLAB, DATA, HERE, machine, run, save

WORK = HERE / "work" / "transfer"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = 100


def link_folder(out, classes, per_class: int | None) -> None:
    """An image-folder tree of symbolic links: train/ (the first `per_class` files of each class), test/ (all)."""
    for split in ("train", "test"):
        for c in classes:
            (out / split / c).mkdir(parents=True, exist_ok=True)
            files = sorted(os.listdir(DATA / split / c))
            for name in files[:per_class] if split == "train" and per_class else files:
                os.symlink(DATA / split / c / name, out / split / c / name)


def pretrain(epochs: int) -> tuple[str, float, float]:
    """The backbone file, its pre-training test accuracy on classes 0-4, and its seconds."""
    run_dir = WORK / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds, code, _ = run([*CNNLAB, "train", "--preset", "standard", "--model", "resnet18_imagenet", "--data",
                            str(WORK / "first5"), "--epochs", str(epochs), "--out", str(run_dir), "--no-report"],
                           WORK / "pretrain.log")
    if code:
        raise SystemExit(f"pre-training failed: see {WORK / 'pretrain.log'}")
    weights = {k: v for k, v in load_file(str(run_dir / "model.safetensors")).items() if not k.startswith("fc.")}
    path = WORK / "cifar5-resnet18.safetensors"
    save_file(weights, str(path))
    accuracy = json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
    return str(path), accuracy, seconds


def variants(backbone: str) -> dict[str, list[str]]:
    common = ["--preset", "finetune", "--model", "resnet18_imagenet", "--normalize", "meanstd", "--data",
              str(WORK / "last5")]
    return {"fine-tune": [*common, "--pretrained", backbone],
            "scratch": [*common, "--pretrained", "none", "--freeze-epochs", "0", "--lr-spread", "1"],
            "head-only": [*common, "--pretrained", backbone, "--head-only"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    link_folder(WORK / "first5", CLASSES[:5], None)
    link_folder(WORK / "last5", CLASSES[5:], PER_CLASS)
    backbone, pre_acc, pre_seconds = pretrain(args.pretrain_epochs)
    print(f"pre-trained on classes 0-4 in {pre_seconds:.0f} s: {pre_acc:.2%} on their test images; {backbone}")
    results = {}
    for name, flags in variants(backbone).items():
        accs, secs = [], []
        for seed in args.seeds:
            out = WORK / f"{name}-{seed}"
            seconds, code, _ = run([*CNNLAB, "train", *flags, "--epochs", str(args.epochs), "--seed", str(seed),
                                    "--out", str(out), "--no-report"], WORK / f"{name}-{seed}.log")
            if code:
                raise SystemExit(f"{name} failed: see {WORK / f'{name}-{seed}.log'}")
            accs.append(json.loads((out / "metrics.json").read_text())["test_accuracy"])
            secs.append(seconds)
        results[name] = {"test_accuracy": accs, "mean": statistics.mean(accs), "seconds": secs,
                         "mean_seconds": statistics.mean(secs), "flags": flags}
        print(f"{name:<10} test accuracy {statistics.mean(accs):.2%} ({', '.join(f'{a:.2%}' for a in accs)}), "
              f"{statistics.mean(secs):.1f} s a run")
    out = {"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M"), "pretrain": {
        "epochs": args.pretrain_epochs, "test_accuracy_classes_0_4": pre_acc, "seconds": pre_seconds},
        "train_images_per_class": PER_CLASS, "epochs": args.epochs, "seeds": args.seeds, "results": results}
    save("transfer", out)


if __name__ == "__main__":
    main()
