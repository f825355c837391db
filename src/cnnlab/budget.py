"""`cnnlab train --budget 10m`: the recipe and number of epochs expected to give the best accuracy within a
wall-clock budget on this machine, now.

How: measure one training step of each candidate recipe here (about a second each, on the thread count
training would get), turn it into seconds per epoch for the data at hand, and take, for each recipe, the
most epochs that fit; then pick the recipe whose known accuracy after that many epochs is highest
(ACCURACY below, measured on CIFAR-10 by `benchmarks/budget.py --curves`). The schedule is sized to those
epochs (both recipes' one-cycle shapes need the total). The budget covers training and the per-epoch
validation (on a fixed sample of VAL_SAMPLE images); the final evaluation comes after it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

from cnnlab.config import TrainConfig
from cnnlab.errors import CnnlabError

# Test accuracy (%) on CIFAR-10 after E epochs of each recipe (its schedule sized to E): benchmarks/budget.py
# --curves, Intel Xeon (avx512_bf16 class), bf16, seed 0, 2026-11-25 (training seconds there: quick 8.4 s an
# epoch, fast 45-55). Between measured epochs the curve is interpolated in log(E); beyond the last one it is
# taken as flat (no claim that more epochs help further).
ACCURACY = {
    "quick": {1: 74.32, 2: 77.78, 4: 79.82, 8: 81.92},
    "fast": {1: 77.05, 2: 84.24, 4: 88.56, 8: 90.73},
}
VAL_SAMPLE = 1000  # images validated after each epoch but the last (which validates on all)
# measured steps are a clean batch on a warm model; batches, augmentation and the host add a little. (1.15 left
# a third of the 10-minute budget unused on 11-25: fast's epochs also speed up once its whitening bias freezes)
SAFETY = 1.05
MAX_EPOCHS = 100


@dataclass
class Plan:
    preset: str
    epochs: int
    epoch_seconds: float  # expected, training and its per-epoch validation
    expected_accuracy: float  # on CIFAR-10, from ACCURACY
    considered: dict[str, tuple[int, float]]  # each recipe: (epochs that fit, expected accuracy)

    def describe(self) -> str:
        others = "; ".join(f"{k}: {e} epoch{'s' * (e != 1)} -> {a:.1f}%" for k, (e, a) in self.considered.items())
        return (f"budget plan: {self.preset} for {self.epochs} epoch{'s' * (self.epochs != 1)} of ~"
                f"{self.epoch_seconds:.1f} s (expected {self.expected_accuracy:.1f}% on CIFAR-10; {others})")


def parse(text: str) -> float:
    """'90s', '10m', '1.5h' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise CnnlabError(f"--budget {text!r} is not a duration such as 90s, 10m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def accuracy_after(preset: str, epochs: float) -> float:
    """The recipe's CIFAR-10 accuracy after `epochs`, interpolated in log(epochs) from ACCURACY."""
    points = sorted(ACCURACY[preset].items())
    if epochs <= points[0][0]:
        return points[0][1]
    for (e0, a0), (e1, a1) in zip(points, points[1:], strict=False):
        if epochs <= e1:
            return a0 + (a1 - a0) * math.log(epochs / e0) / math.log(e1 / e0)
    return points[-1][1]


def plan(seconds: float, epoch_seconds: dict[str, float]) -> Plan:
    """The best expected accuracy over the recipes, each given the whole epochs that fit in `seconds`."""
    considered = {}
    for preset, per_epoch in epoch_seconds.items():
        epochs = min(MAX_EPOCHS, int(seconds // per_epoch))
        considered[preset] = (epochs, accuracy_after(preset, epochs) if epochs else 0.0)
    fitting = {k: v for k, v in considered.items() if v[0] >= 1}
    if not fitting:
        cheapest = min(epoch_seconds, key=epoch_seconds.get)
        raise CnnlabError(f"a budget of {seconds:.0f} s fits no whole epoch here: one epoch of {cheapest} takes about "
                          f"{epoch_seconds[cheapest]:.0f} s on this machine now; give a larger --budget or --subset")
    best = max(fitting, key=lambda k: (fitting[k][1], -epoch_seconds[k]))
    return Plan(best, fitting[best][0], epoch_seconds[best], fitting[best][1], considered)


def measure(presets: dict[str, TrainConfig], train_images: int, val_images: int, device, dtype,
            seconds: float = 1.0) -> dict[str, float]:
    """Expected seconds per epoch of each recipe here, now: its measured step times its steps, with the
    validation of VAL_SAMPLE images (forward only: about a third of a training step per image)."""
    from cnnlab.doctor import step_seconds

    out, steps_seen = {}, {name: [] for name in presets}
    for _ in range(2):  # twice, interleaved, and the faster: one measurement in ten here ran 1.5x slow
        for name, cfg in presets.items():
            steps_seen[name].append(step_seconds(cfg, cfg.batch_size, device, dtype, seconds))
    for name, cfg in presets.items():
        step = min(steps_seen[name])
        steps = math.ceil(train_images / cfg.batch_size)
        val = min(VAL_SAMPLE, val_images) / cfg.batch_size * step / 3
        out[name] = (steps * step + val) * SAFETY
    return out


def budget_config(plan_: Plan, base: TrainConfig) -> TrainConfig:
    """The chosen recipe sized to its epochs, validating on a sample until the last epoch."""
    return replace(base, epochs=plan_.epochs, val_sample=VAL_SAMPLE)


def train_within(seconds: float, data_cfg, *, out=None, with_report: bool = True,
                 tracking: tuple[str, ...] = (), device: str = "auto", seed: int = 0):
    """Plan for this machine and data, say the plan, and train it; returns the run directory."""
    from cnnlab import presets, training
    from cnnlab.device import pick_device, pick_precision

    data_cfg = data_cfg.validate()
    ds = training.load_data(data_cfg, seed)
    if max(ds.image_size) > 64:
        raise CnnlabError(f"--budget plans with CIFAR-sized recipes (quick, fast) and {ds.source} is "
                          f"{ds.image_size[0]}x{ds.image_size[1]}: use --preset photos and --epochs")
    dev = pick_device(device)
    candidates = {name: replace(presets.get(name), device=device, seed=seed) for name in ACCURACY}
    per_epoch = measure(candidates, len(ds.y_train), len(ds.validation[1]), dev,
                        pick_precision(candidates["quick"].precision, dev))
    chosen = plan(seconds, per_epoch)
    logging.getLogger(__name__).info(chosen.describe())
    return training.train(budget_config(chosen, candidates[chosen.preset]), data_cfg, preset=chosen.preset, out=out,
                       dataset=ds, with_report=with_report, tracking=tracking)
