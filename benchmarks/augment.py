"""Batched augmentations: cnnlab's hand-written tensor code against kornia's, on the CPU.

    .venv/bin/python benchmarks/augment.py [--batch 256] [--size 32] [--repeat 20]

For each operation both implement (colour jitter, random erasing, MixUp, CutMix) it prints milliseconds per
batch, and kornia's RandAugment's alone (cnnlab uses kornia's: writing its 14 operations is not worth it).
The rule (issue "training the way practitioners expect"): kornia where it is at least as fast, hand-written
code where it is clearly slower. Writes benchmarks/results/augment.json with the CPU class.
"""

from __future__ import annotations

import argparse
import time

import torch

from cnnlab.data import augment, mix
from common import machine, save


def per_batch_ms(fn, repeat: int) -> float:
    fn()  # first call: allocations, lazy imports
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return round((time.perf_counter() - t0) / repeat * 1000, 3)


def main() -> None:
    import kornia.augmentation as K
    from kornia.augmentation.auto import RandAugment

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    g = torch.Generator().manual_seed(0)
    pairs = {
        "color jitter": (lambda: augment.color_jitter(x, g), lambda: K.ColorJitter(0.4, 0.4, 0.4, p=1.0)(x)),
        "random erasing": (lambda: augment.random_erasing(x, g), lambda: K.RandomErasing(p=0.25)(x)),
        "mixup": (lambda: mix.mix(["mixup"], x, y, g, 10),
                  lambda: K.RandomMixUpV2(data_keys=["input", "class"])(x, y)),
        "cutmix": (lambda: mix.mix(["cutmix"], x, y, g, 10),
                   lambda: K.RandomCutMixV2(data_keys=["input", "class"])(x, y)),
    }
    result = {"machine": machine(), "batch": args.batch, "size": args.size, "ms_per_batch": {}}
    for name, (ours, theirs) in pairs.items():
        a, b = per_batch_ms(ours, args.repeat), per_batch_ms(theirs, args.repeat)
        result["ms_per_batch"][name] = {"cnnlab": a, "kornia": b}
        print(f"{name:<15} cnnlab {a:7.2f} ms   kornia {b:7.2f} ms   ({b / a:.1f}x)")
    ra = per_batch_ms(lambda: RandAugment(n=2, m=9)(x), args.repeat)
    result["ms_per_batch"]["randaugment (kornia)"] = {"kornia": ra}
    print(f"{'randaugment':<15} kornia {ra:7.2f} ms (cnnlab calls it)")
    save("augment", result)


if __name__ == "__main__":
    main()
