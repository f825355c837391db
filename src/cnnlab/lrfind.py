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
import torch.nn.functional as F
from torch import nn

from . import finetune, models
from .config import TrainConfig
from .data import Dataset
from .device import autocast, pick_device, pick_precision
from .optim import make_optimizer, step_lr
from .train import init_from_data


@dataclass
class LRFind:
    lrs: list[float]  # the learning rate of each step (per step, as the optimizer applies it)
    losses: list[float]  # the smoothed loss after each step
    suggestion: float  # the rate to train with, per step: a tenth of where the smoothed loss was lowest
    steepest: float  # where the smoothed loss fell fastest (fastai's "steep")
    per_1024: bool  # whether `flag_value` is per 1024 examples (the config's convention for --lr)
    flag_value: float  # the suggestion as `--lr` takes it under this config

    def plot(self):
        from .plots import subplots

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
    """Sweep the learning rate from `start` to `end` over `steps` batches of the training set."""
    device = pick_device(cfg.device)
    dtype = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    if model is None:
        model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size)
        finetune.start_from(model, cfg, log=lambda *_: None)  # --pretrained / --init-from, as training starts
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device).train()
    norm = finetune.normalization(cfg, ds, None)
    init_from_data(model, ds, norm, cfg.seed, device)  # airbench's whitening layer, as training sets it
    opt = make_optimizer(cfg, model)
    ratios = [group["lr"] / step_lr(cfg) for group in opt.param_groups]  # bias groups keep their multiple
    g = torch.Generator().manual_seed(cfg.seed)
    lrs, losses, best, avg = [], [], math.inf, 0.0
    try:
        for i in range(steps):
            lr = start * (end / start) ** (i / max(steps - 1, 1))
            for group, ratio in zip(opt.param_groups, ratios, strict=True):
                if not group.get("orthogonal"):  # muon's filter steps are angles: not swept
                    group["lr"] = lr * ratio
            idx = torch.randint(len(ds.y_train), (cfg.batch_size,), generator=g)
            loss = _step(model, opt, norm(ds.x_train[idx].to(device)), ds.y_train[idx].to(device), device, dtype)
            avg = smooth * avg + (1 - smooth) * loss  # a debiased running mean, as fastai's
            value = avg / (1 - smooth ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            best = min(best, value)
            if not math.isfinite(value) or value > diverge * best:
                break
    finally:
        model.load_state_dict(saved)  # the weights and statistics as they were
    return _suggest(cfg, lrs, losses)


def _step(model, opt, x, y, device, dtype) -> float:
    with autocast(device, dtype):
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()  # one host read a step: this is a diagnostic, not the training loop


def _suggest(cfg: TrainConfig, lrs: list[float], losses: list[float]) -> LRFind:
    finite = [(lr, v) for lr, v in zip(lrs, losses, strict=True) if math.isfinite(v)]
    lowest = min(finite, key=lambda p: p[1])[0] if finite else lrs[0]
    skip = len(finite) // 10  # the running mean's first values move with its warm-up, not with the rate
    slopes = [(finite[i][0], finite[i + 1][1] - finite[i][1]) for i in range(skip, len(finite) - 1)]
    steepest = min(slopes, key=lambda p: p[1])[0] if slopes else lowest
    suggestion = lowest / 10
    per_step_of_one = step_lr(replace(cfg, lr=1.0))  # what --lr 1 means per step under this config
    return LRFind(lrs, losses, suggestion, steepest, cfg.per_1024, suggestion / per_step_of_one)
