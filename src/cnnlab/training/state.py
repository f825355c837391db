"""`TrainState`: everything a checkpoint holds, saved and restored in one place.

The model, optimizer, schedule, gradient scaler, lookahead average, normalization, the torch and epoch
RNG states, the position (epoch, step), the history, and the running totals of the current epoch. The
totals live on the training device and are added to without reading them back (see `add`), so the hot
loop never waits for the device; `read()` is the one place that copies them to the host.

Under several processes each rank holds its own totals; `state_dict(world)` sums them (every rank must
call it) so the checkpoint holds the global state, and any number of processes can resume it. The count
of skipped steps is the exception: every rank skips the same steps (train.py decides on the averaged
gradients), so each rank's count is already the global one, and it is not summed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cnnlab import dist
from cnnlab.data.dataset import Normalization
from cnnlab.dist import World
from cnnlab.errors import CnnlabError
from cnnlab.training.optim import EMA, Lookahead

# The running totals of an epoch, in this order in `TrainState.totals`.
LOSS, CORRECT, SEEN, SKIPPED, FIRST_BAD = range(5)  # FIRST_BAD: 1 + the step of the epoch's first non-finite step


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    lookahead: Lookahead | None
    norm: Normalization
    device: torch.device
    epoch: int = 0  # the epoch in progress (0-based); equals cfg.epochs when training is done
    step: int = 0  # steps of that epoch already taken
    epoch_rng: torch.Tensor | None = None  # the epoch generator's state at `step` (mid-epoch checkpoints)
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # the best epoch so far: {"epoch", "value", "since"} (epochs since)
    ema: EMA | None = None  # --ema: the averaged weights, which validation and the saved model use

    @property
    def evaluated(self) -> nn.Module:
        """The weights validation, the best epoch and the saved model use: the average under --ema."""
        return self.ema.model if self.ema is not None else self.model
    seconds: float = 0.0  # training time of the epoch in progress
    totals: torch.Tensor = None  # type: ignore[assignment]  (set in __post_init__, on `device`)

    def __post_init__(self):
        if self.totals is None:
            self.reset_totals()

    def reset_totals(self) -> None:
        self.totals = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int, bad: torch.Tensor, step: int) -> None:
        """Count one step on the device, no host read: a non-finite (`bad`) step adds to SKIPPED only."""
        ok = ~bad
        counts = torch.stack([loss.detach().double() * n, correct.double(), ok.double() * n])
        self.totals[LOSS:SEEN + 1] += torch.where(ok, counts, 0.0)  # (where, not a product: the loss may be NaN)
        self.totals[SKIPPED] += bad
        first = bad & (self.totals[FIRST_BAD] == 0)
        self.totals[FIRST_BAD] = torch.where(first, step + 1.0, self.totals[FIRST_BAD])

    def read(self) -> dict:
        """This rank's totals on the host (one device sync)."""
        loss, correct, seen, skipped, first_bad = self.totals.tolist()
        return {"loss": loss, "correct": int(correct), "seen": int(seen), "skipped": int(skipped),
                "first_bad_step": int(first_bad) - 1 if first_bad else None}

    def set_total_steps(self, total: int) -> None:
        """Move the end of training to step `total` (a run re-planned between epochs: Fit.replan): the
        learning-rate schedule and the lookahead average end there instead."""
        self.schedule.span["total"] = total
        if self.lookahead is not None:
            self.lookahead.total_steps = total

    # -- checkpoints ---------------------------------------------------------------------------------

    def state_dict(self, world: World) -> dict:
        """The global state: every rank calls this (the totals are summed); rank 0 writes the result."""
        totals = dist.all_sum(world, self.totals.tolist(), self.device)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "lookahead": self.lookahead.state_dict() if self.lookahead else None,
                "normalization": self.norm.to_dict(), "epoch": self.epoch, "step": self.step,
                "epoch_rng": self.epoch_rng if self.step else None, "torch_rng": torch.get_rng_state(),
                "history": self.history, "best": self.best, "ema": self.ema.state_dict() if self.ema else None,
                "running": {"loss": totals[LOSS], "correct": int(totals[CORRECT]), "seen": int(totals[SEEN]),
                            "skipped": int(self.totals[SKIPPED]), "seconds": self.seconds}}

    def load_state_dict(self, state: dict, world: World) -> None:
        """Restore a checkpoint; rank 0 takes the saved sums, the other ranks start theirs from zero (and every
        rank takes the skipped count, which is the same on all)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:  # another network's (or run's) checkpoint
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CnnlabError(f"the checkpoint does not fit this run's network and optimizer ({first[:200]}): it "
                              "was written by another run; start a new one") from None
        self.schedule.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        self.norm = Normalization.from_dict(state["normalization"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.epoch_rng = state.get("epoch_rng")
        self.best = dict(state.get("best") or {})
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.reset_totals()
        running = state["running"]
        if self.step:  # mid-epoch: continue this epoch's totals
            if world.main:
                self.totals[:SKIPPED] = torch.tensor([running["loss"], running["correct"], running["seen"]],
                                                     dtype=torch.float64)
            self.totals[SKIPPED] = float(running.get("skipped", 0))
        self.seconds = running.get("seconds", 0.0) if self.step else 0.0
