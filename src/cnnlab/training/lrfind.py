"""The learning-rate range test (Smith 2017, fastai's `lr_find`): train a few hundred batches while the
learning rate grows exponentially from tiny to huge, watch the smoothed loss, and suggest a rate.

    result = find_lr(cfg, dataset)           # cfg: a TrainConfig (its model, optimizer, batch size)
    result.suggestion, result.plot().savefig("lr_find.png")

The model, optimizer and data are built as training builds them; the model's weights (and BatchNorm
statistics) are put back afterwards, so `find_lr(..., model=m)` leaves `m` as it was. The sweep stops early
when the smoothed loss passes `diverge` times its lowest value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from cnnlab import models
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import Dataset
from cnnlab.device import pick_device, pick_precision
from cnnlab.training import finetune
from cnnlab.training.build import init_from_data
from cnnlab.training.loop import Fit, Hook, fit
from cnnlab.training.optim import make_optimizer, step_lr
from cnnlab.training.state import TrainState
from cnnlab.training.step import Step


@dataclass
class LRFind:
    lrs: list[float]  # the learning rate of each step (per step, as the optimizer applies it)
    losses: list[float]  # the smoothed loss after each step
    suggestion: float  # the rate to train with, per step: a tenth of where the smoothed loss was lowest
    steepest: float  # where the smoothed loss fell fastest (fastai's "steep")
    per_1024: bool  # whether `flag_value` is per 1024 examples (the config's convention for --lr)
    flag_value: float  # the suggestion as `--lr` takes it under this config

    def plot(self):
        from cnnlab.evaluation.plots import subplots

        fig, ax = subplots(figsize=(7, 4.2))
        ax.plot(self.lrs, self.losses)
        ax.set_xscale("log")
        for x, label, style in ((self.suggestion, "suggestion", "--"), (self.steepest, "steepest fall", ":")):
            ax.axvline(x, color="black", linestyle=style, label=f"{label}: {x:.2g}")
        ax.set(xlabel="learning rate (per step)", ylabel="smoothed training loss", title="Learning-rate range test")
        ax.grid(alpha=0.3)
        ax.legend()
        return fig


def find_lr(cfg: TrainConfig, ds: Dataset, *, start: float = 1e-7, end: float = 10.0, steps: int = 100,
            smooth: float = 0.98, diverge: float = 4.0, model: nn.Module | None = None) -> LRFind:
    """Sweep the learning rate from `start` to `end` over `steps` batches of the training set, through the
    training loop: the sweep is the schedule, and a hook reads each step's loss."""
    cfg = replace(cfg, freeze_epochs=0, whiten_bias_epochs=None, epochs=1)  # everything trains, from the first step
    device = pick_device(cfg.device)
    dtype = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    if model is None:
        model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size)
        finetune.start_from(model, cfg, say=False)  # --pretrained / --init-from, as training starts
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device)
    norm = finetune.normalization(cfg, ds, None, say=False)
    init_from_data(model, ds, norm, cfg.seed, device)  # airbench's whitening layer, as training sets it
    opt = make_optimizer(cfg, model)
    ts = TrainState(model, opt, Sweep(opt, step_lr(cfg), start, end, steps), torch.amp.GradScaler(enabled=False),
                    None, norm, device)
    losses = Losses(smooth, diverge)
    try:
        fit(ts, SampledBatches(ds, norm, cfg.batch_size, steps, cfg.seed, device),
            Step(cfg, device, dtype, steps), [losses], epochs=1)
    except Diverged:
        pass
    finally:
        model.load_state_dict(saved)  # the weights and statistics as they were
    return _suggest(cfg, ts.schedule.lrs[:len(losses.values)], losses.values)


class Sweep:
    """The range test's schedule: step i sets the rate start * (end/start)^(i/(steps-1)), each group keeping
    its multiple of the base rate (muon's filter steps are angles: not swept)."""

    def __init__(self, opt: torch.optim.Optimizer, base: float, start: float, end: float, steps: int):
        self.opt, self.ratios = opt, [group["lr"] / base for group in opt.param_groups]
        self.lrs = [start * (end / start) ** (i / max(steps - 1, 1)) for i in range(steps)]
        self.i = 0
        self._set()

    def _set(self) -> None:
        lr = self.lrs[min(self.i, len(self.lrs) - 1)]
        for group, ratio in zip(self.opt.param_groups, self.ratios, strict=True):
            if not group.get("orthogonal"):
                group["lr"] = lr * ratio

    def step(self) -> None:
        self.i += 1
        self._set()


class SampledBatches:
    """`steps` batches drawn at random (with replacement) from the training set, normalized, not augmented."""

    def __init__(self, ds: Dataset, norm, batch_size: int, steps: int, seed: int, device: torch.device):
        self.ds, self.norm, self.batch_size, self.steps, self.device = ds, norm, batch_size, steps, device
        self.g = torch.Generator().manual_seed(seed)

    def epoch(self, epoch: int, start: int = 0, rng=None):
        for i in range(start, self.steps):
            idx = torch.randint(len(self.ds.y_train), (self.batch_size,), generator=self.g)
            x = self.norm(self.ds.x_train[idx].to(self.device)).contiguous(memory_format=torch.channels_last)
            yield i, x, self.ds.y_train[idx].to(self.device)

    def rng_state(self) -> torch.Tensor:
        return self.g.get_state()


class Diverged(Exception):
    pass


class Losses(Hook):
    """Each step's loss (one host read a step: this is a diagnostic, not the training loop), smoothed as fastai
    does (a debiased running mean); stops the sweep once it passes `diverge` times its lowest value."""

    def __init__(self, smooth: float, diverge: float):
        self.smooth, self.diverge, self.values, self.avg, self.best, self.seen = smooth, diverge, [], 0.0, math.inf, 0.0
        self.loss_sum = 0.0

    def after_step(self, fit: Fit) -> None:
        t = fit.state.read()
        loss = (t["loss"] - self.loss_sum) / max(t["seen"] - self.seen, 1) if not t["skipped"] else math.inf
        self.loss_sum, self.seen = t["loss"], t["seen"]
        self.avg = self.smooth * self.avg + (1 - self.smooth) * loss
        value = self.avg / (1 - self.smooth ** len(self.values + [0]))
        self.values.append(value)
        self.best = min(self.best, value)
        if not math.isfinite(value) or value > self.diverge * self.best:
            raise Diverged


def _suggest(cfg: TrainConfig, lrs: list[float], losses: list[float]) -> LRFind:
    finite = [(lr, v) for lr, v in zip(lrs, losses, strict=True) if math.isfinite(v)]
    lowest = min(finite, key=lambda p: p[1])[0] if finite else lrs[0]
    skip = len(finite) // 10  # the running mean's first values move with its warm-up, not with the rate
    slopes = [(finite[i][0], finite[i + 1][1] - finite[i][1]) for i in range(skip, len(finite) - 1)]
    steepest = min(slopes, key=lambda p: p[1])[0] if slopes else lowest
    suggestion = lowest / 10
    per_step_of_one = step_lr(replace(cfg, lr=1.0))  # what --lr 1 means per step under this config
    return LRFind(lrs, losses, suggestion, steepest, cfg.per_1024, suggestion / per_step_of_one)
