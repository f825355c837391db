"""`Step`: one training step (forward, backward, update) with no host read; also what `cnnlab doctor` times.

A non-finite step never changes the weights even though nobody looks at once: the optimizer receives a
device-side `found_inf` flag and skips its update inside its own kernel (fused Adam and SGD do this for
GradScaler; FilterMuon and Lookahead honour the same flag), and under `--on-nan skip-batch` the BatchNorm
statistics that the bad forward pass moved are put back. The loss, the correct count and the skipped-step
count add up on the device (TrainState.add); the loop reads them every SYNC_EVERY steps.

The step also owns what the model looks like to it: `begin_epoch` sets what trains in the epoch and (re)builds
the DistributedDataParallel wrapper when that changed. `--compile` compiles once per run, for a static batch
size: at the first epoch whose trainable set is the rest of the run's (the frozen-body epochs of a fine-tune run
eagerly before it), and a batch of another size (the short last one) runs the same weights eagerly rather than
recompiling; airbench's whitening bias, which stops training after some epochs, is then frozen by dropping its
gradient before each update, not by `requires_grad` (which would change the graph: a second compile).
"""

from __future__ import annotations

import contextlib
import gc

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cnnlab.config import TrainConfig
from cnnlab.device import autocast
from cnnlab.dist import World
from cnnlab.training import finetune
from cnnlab.training.state import TrainState


class Step:
    def __init__(self, cfg: TrainConfig, device: torch.device, dtype: torch.dtype, steps_per_epoch: int,
                 world: World = World(), class_weight: torch.Tensor | None = None):
        self.cfg, self.device, self.dtype, self.world = cfg, device, dtype, world
        self.steps_per_epoch, self.class_weight = steps_per_epoch, class_weight
        self.forward: nn.Module | None = None  # the model as the step calls it (DDP and/or compiled)
        self.eager: nn.Module | None = None  # the same without compilation (a batch of another size)
        self.compiled_batch: int | None = None  # the batch size the compiled graph is for (its first)
        self.trained: list[torch.Tensor] = []  # the parameters `forward` was built to train
        self.dropped: list[torch.Tensor] = []  # frozen by dropping their gradients (under --compile)

    def __call__(self, ts: TrainState, xb: torch.Tensor | None, yb: torch.Tensor | None, step: int) -> None:
        """Forward, backward and update; a non-finite step leaves the weights as they were. A batch of None (a
        last batch smaller than the number of processes) only moves the schedule, on every process alike."""
        if xb is None:
            ts.schedule.step()
            return
        guarded = list(ts.model.buffers()) if self.cfg.on_nan == "skip-batch" else []  # BatchNorm statistics
        saved = [b.clone() for b in guarded]
        ts.optimizer.zero_grad(set_to_none=True)
        loss, correct = self.forward_backward(ts, xb, yb)
        for p in self.dropped:  # (the optimizer leaves a parameter without a gradient as it is)
            p.grad = None
        bad = ~torch.isfinite(loss)
        if self.cfg.clip_grad:  # on the true gradients: unscaled first when fp16 scales them
            ts.scaler.unscale_(ts.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trained, self.cfg.clip_grad, foreach=True)
        if not ts.scaler.is_enabled():  # (GradScaler finds non-finite gradients itself, and expects them)
            if self.world.distributed:  # the averaged gradients are the same on every rank: so is the decision
                bad = ~torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in self.trained
                                                                      if p.grad is not None]))
            ts.optimizer.found_inf = bad.float()  # the optimizer skips its update on the device when set
            ts.optimizer.step()
        else:
            ts.scaler.step(ts.optimizer)
            ts.scaler.update()
        ts.schedule.step()  # every step, skipped or not: the schedule stays aligned with the step count
        for b, s in zip(guarded, saved, strict=True):
            b.copy_(torch.where(bad, s, b))
        if ts.lookahead is not None:
            ts.lookahead.step(ts.model, ts.epoch * self.steps_per_epoch + step + 1, skip=bad)
        if ts.ema is not None:
            ts.ema.update(ts.model)
        ts.add(loss, correct, len(yb), bad, step)

    def forward_backward(self, ts: TrainState, xb: torch.Tensor, yb: torch.Tensor) -> tuple:
        """The batch's loss (its mean) and correct count, its gradients added to the parameters': in one pass, or
        in --accumulate slices (under DDP the gradients are exchanged once, after the last slice)."""
        slices = self.cfg.accumulate
        loss_sum, correct = 0, 0
        for i, (xs, ys) in enumerate(zip(xb.chunk(slices), yb.chunk(slices), strict=True)):
            forward = self.forward_for(len(xs))
            quiet = self.world.distributed and i < slices - 1 and hasattr(forward, "no_sync")
            with forward.no_sync() if quiet else contextlib.nullcontext():
                with autocast(self.device, self.dtype):
                    logits = forward(xs)
                    loss = F.cross_entropy(logits.float(), ys, weight=self.class_weight,
                                           label_smoothing=self.cfg.label_smoothing)
                if slices > 1:
                    loss = loss * (len(ys) / len(yb))  # the slices' means add up to the batch's mean
                ts.scaler.scale(loss).backward()
            loss_sum = loss_sum + loss.detach()
            correct = correct + (logits.argmax(1) == (ys.argmax(1) if ys.ndim == 2 else ys)).sum()
        return loss_sum, correct

    def forward_for(self, batch: int) -> nn.Module:
        """The compiled model for the batch size it was compiled for (the first it saw), else the eager one."""
        if self.forward is self.eager:
            return self.eager
        self.compiled_batch = self.compiled_batch or batch
        return self.forward if batch == self.compiled_batch else self.eager

    # -- what trains, and the wrapper around it ---------------------------------------------------------

    def begin_epoch(self, ts: TrainState) -> None:
        """Set what trains in the epoch, (re)wrap the model if that changed, and put it in training mode (a
        frozen body's normalization layers keep their statistics)."""
        self.dropped = set_trainable(ts.model, self.cfg, ts.epoch, by_gradient=self.cfg.compile)
        self.wrap(ts.model, compile_now=self.cfg.compile and not finetune.body_frozen(self.cfg, ts.epoch))
        ts.model.train()
        finetune.freeze_norms(ts.model, finetune.body_frozen(self.cfg, ts.epoch))

    def wrap(self, model: nn.Module, compile_now: bool = False) -> None:
        """(Re)build the forward wrapper when the set of trainable parameters changed.

        DistributedDataParallel records at construction which parameters take gradients and waits for each
        of them in every backward pass; a parameter frozen afterwards never arrives and the step fails
        ("Expected to have finished reduction..."). Rebuilding the wrapper at the epoch where the set changes
        keeps the arithmetic of one process exactly (a frozen parameter gets no gradient, so the optimizer
        leaves it and its momentum alone) for the price of one broadcast of the weights; freezing by zeroing
        gradients would not (momentum and weight decay would still move it), and find_unused_parameters
        would walk the autograd graph on every step.
        """
        trained = [p for p in model.parameters() if p.requires_grad]
        if self.forward is not None and [id(p) for p in trained] == [id(p) for p in self.trained]:
            if compile_now and self.forward is self.eager:
                self.forward, self.compiled_batch = torch.compile(self.eager, dynamic=False), None
            return
        self.release()
        forward = model
        if self.world.distributed:
            forward = DDP(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.eager, self.compiled_batch = forward, None
        self.forward = torch.compile(forward, dynamic=False) if compile_now else forward
        self.trained = trained

    def release(self) -> None:
        """Free the current wrapper now, while the process group lives. DDP's reducer sits in reference cycles,
        so it would otherwise be freed by a later garbage collection, possibly at exit after the process group
        was destroyed. (A two-process run whose wrapper had been rebuilt ended once in CI with one rank
        aborting at exit, "terminate called without an active exception"; 16 runs did not repeat it, so this
        is the likely cause removed, not a proven one.)"""
        if self.forward is not None:
            self.forward = self.eager = None
            if self.world.distributed:  # one process holds no reducer; a full collection costs 0.06 s
                gc.collect()


def set_trainable(model: nn.Module, cfg: TrainConfig, epoch: int, by_gradient: bool = False) -> list[torch.Tensor]:
    """The parameters that train in `epoch`: the head alone during --freeze-epochs (a frozen body gets no
    gradients, so the optimizer leaves it and its state alone); airbench's whitening bias only for its first
    epochs. With `by_gradient` (--compile), a whitening bias that stops training mid-run keeps requires_grad
    and is returned instead: the step drops its gradient before each update (one graph for the whole run;
    the backward pass through the first layer is the price, 15% of `fast`'s step on a CPU)."""
    if cfg.freeze_epochs:
        finetune.freeze_body(model, finetune.body_frozen(cfg, epoch))
    if cfg.whiten_bias_epochs is None or not hasattr(model, "whiten") or finetune.body_frozen(cfg, epoch):
        return []
    trains = epoch < cfg.whiten_bias_epochs
    if by_gradient and 0 < cfg.whiten_bias_epochs < cfg.epochs:  # (frozen or trained throughout: no change)
        model.whiten.bias.requires_grad_(True)
        return [] if trains else [model.whiten.bias]
    model.whiten.bias.requires_grad_(trains)
    return []
