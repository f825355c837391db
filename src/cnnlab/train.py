"""The training loop: flat and visible, one epoch after another, a checkpoint after each.

    run = train(presets.get("seed"), DataConfig(path="cifar10-jpeg"))   # returns the run directory
    resume(run)                                                           # after an interruption

`fit()` reads in one screen: build the state, then per epoch set what trains (and wrap the model for
data-parallel training when that changed), run the epoch's steps, and end the epoch (validate, record,
checkpoint). Everything a checkpoint holds is one `TrainState` (state.py).

The hot loop never waits for the device. The loss, the correct count and the skipped-step count add up
on the device; the host reads them every `SYNC_EVERY` steps (and at the end of an epoch) to update the
progress bar, to stop on a non-finite loss, and, under several processes, to agree on Ctrl-C. A
non-finite step never changes the weights even though nobody looks at once: the optimizer receives a
device-side `found_inf` flag and skips its update inside its own kernel (fused Adam and SGD do this for
GradScaler; FilterMuon and Lookahead honour the same flag), and under `--on-nan skip-batch` the BatchNorm
statistics that the bad forward pass moved are put back.

A seeded CPU run at a steady thread count (threads.py) is bit-for-bit repeatable: every epoch draws its
shuffle and augmentations from its own generator seeded by (seed, epoch), and a checkpoint stores that
generator's state mid-epoch, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import (
    __version__,
    augment,
    batchnorm,
    checkpoints,
    data,
    dist,
    evaluate,
    files,
    finetune,
    hardware,
    mix,
    models,
    pretrained,
    probe,
    report,
    runs,
)
from . import tracking as tracking_mod
from .analysis import Interpretation
from .config import DataConfig, TrainConfig, from_dict
from .data import Dataset, Normalization
from .device import autocast, keep_freed_memory, pick_device, pick_precision, precision_name, precision_warning
from .dist import World
from .errors import CnnlabError, EveryProcessError, Interrupted
from .optim import EMA, Lookahead, improves, make_optimizer, make_schedule, step_lr
from .state import TrainState
from .threads import ThreadGovernor, keeps_thread_count

STOP = threading.Event()  # set by Ctrl-C; the loop checks it between steps so no update is cut in half
# What a run writes after its weights (model.safetensors, then model.json), in order; report.html comes last.
END_FILES = ("metrics.json", "confusion_matrix.csv", "confusion_matrix.json")
PICTURES = ("confusion_matrix.png", "report.html")  # not with --no-report: matplotlib alone costs 0.4 s
# Steps between host reads of the running totals. A read waits for the device to finish its queue: a GPU
# queues ~20 small steps ahead in the time the host takes to launch them, and on a CPU (where every op has
# already run when it returns) a read costs a few microseconds, so nothing is lost either way.
SYNC_EVERY = 20


def say(*args) -> None:
    """Print and flush at once, so progress shows up in logs and pipes as it happens."""
    print(*args, flush=True)


@dataclass
class Loop:
    """What stays fixed while training: the configuration, data on the device, and the wrapped model."""
    cfg: TrainConfig
    ds: Dataset
    world: World
    run_dir: Path
    log: object
    device: torch.device
    dtype: torch.dtype
    x_train: torch.Tensor
    y_train: torch.Tensor
    steps_per_epoch: int
    forward: nn.Module | None = None  # the model as the steps call it (DDP and/or compiled)
    trained: list[torch.Tensor] = field(default_factory=list)  # the parameters `forward` was built to train
    governor: ThreadGovernor | None = None
    test_logits: torch.Tensor | None = None  # the last validation's, when the validation set is the test set
    val_sample: torch.Tensor | None = None  # --val-sample: the fixed validation images of the epochs before the last
    class_weight: torch.Tensor | None = None  # --class-weights auto: each class's weight in the training loss
    trackers: tracking_mod.Trackers | None = None  # --log tensorboard/mlflow, on process 0
    bn_sample: torch.Tensor | None = None  # training images whose BatchNorm statistics are computed (batchnorm.py)
    bn_batch: int = 0
    warned_chance: bool = False  # the warning that validation stays at chance is given once


# ---------------------------------------------------------------------------------------------------
# Build


def _build(run_dir: Path, cfg: TrainConfig, ds: Dataset, state: dict | None, log, world: World):
    device = dist.device_for(world, pick_device(cfg.device))
    dtype = pick_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same seed on every rank: identical initial weights
    model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size).to(device)
    model = model.to(memory_format=torch.channels_last)  # oneDNN and cuDNN convolutions run faster in NHWC
    for warning in (models.size_warning(model, ds.image_size), precision_warning(dtype, device)):
        if warning and state is None:
            log(warning)
    norm = finetune.normalization(cfg, ds, state, log)
    if world.main:
        _require_space(run_dir, cfg, model)
    steps_per_epoch = -(-len(ds.y_train) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if state is None:
        init_from_data(model, ds, norm, cfg.seed, device)
        finetune.start_from(model, cfg, log)  # --init-from, --pretrained
    ts = _train_state(cfg, _sync_bn(model, cfg, world, device), norm, device, dtype, total_steps,
                      cfg.freeze_epochs * steps_per_epoch)
    if state is not None:
        ts.load_state_dict(state, world)
    loop = Loop(cfg, ds, world, run_dir, log, device, dtype, ds.x_train.to(device), ds.y_train.to(device),
                steps_per_epoch, governor=_threads(cfg, device, log), class_weight=_class_weight(cfg, ds, device, log))
    if 0 < cfg.val_sample < len(ds.validation[1]):
        loop.val_sample = data.stratified_pick(ds.validation[1], cfg.val_sample, cfg.seed, ds.num_classes)
    _plan_bn_stats(loop, ts.model, state is None)
    return ts, loop


def _plan_bn_stats(loop: Loop, model: nn.Module, new: bool) -> None:
    """Where BatchNorm's running averages cannot keep up with an epoch, their exact values are computed
    before each validation (batchnorm.py says why)."""
    momenta = batchnorm.lagging(model, loop.steps_per_epoch)
    if not momenta:
        return
    loop.bn_batch = dist.per_rank_batch(loop.world, loop.cfg.batch_size)  # the statistics training normalizes by
    loop.bn_sample = batchnorm.sample(len(loop.y_train), loop.bn_batch, loop.cfg.seed)
    if new:
        loop.log(f"BatchNorm statistics: computed on {len(loop.bn_sample):,} training images before each "
                 f"validation (momentum {', '.join(f'{m:g}' for m in momenta)} cannot renew the running "
                 f"averages in {loop.steps_per_epoch} steps an epoch)")


def init_from_data(model: nn.Module, ds: Dataset, norm: Normalization, seed: int, device: torch.device) -> None:
    """Layers set from the data before training (airbench's whitening layer), from a seeded sample of 5,000
    CIFAR images' worth of pixels: larger images take fewer, so the patch statistics stay bounded."""
    if not hasattr(model, "init_from_data"):
        return
    count = max(64, min(5000, 5000 * 32 * 32 // (ds.image_size[0] * ds.image_size[1])))
    sample = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))[:count]
    model.init_from_data(norm(ds.x_train[sample]).to(device))


def _train_state(cfg: TrainConfig, model: nn.Module, norm: Normalization, device: torch.device, dtype: torch.dtype,
                 total_steps: int, frozen_steps: int = 0) -> TrainState:
    opt = make_optimizer(cfg, model)  # before any freezing: the optimizer knows every trainable parameter
    return TrainState(model, opt, make_schedule(cfg, opt, total_steps, frozen_steps),
                      torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                      Lookahead(model, total_steps) if cfg.lookahead else None, norm, device,
                      ema=EMA(model, cfg.ema) if cfg.ema else None)


def _class_weight(cfg: TrainConfig, ds: Dataset, device: torch.device, log) -> torch.Tensor | None:
    """--class-weights auto: each class's weight in the training loss, said in the log."""
    if cfg.class_weights != "auto":
        return None
    weights = data.class_weights(ds.y_train, ds.num_classes)
    shown = ", ".join(f"{name} {w:.2f}" for name, w in zip(ds.classes[:10], weights.tolist(), strict=False))
    log(f"class weights (--class-weights auto, the rarer the heavier): {shown}"
        + (f", ... ({ds.num_classes} classes, {weights.min():.2f}-{weights.max():.2f})" if ds.num_classes > 10 else ""))
    return weights.to(device)


def _threads(cfg: TrainConfig, device: torch.device, log) -> ThreadGovernor | None:
    """A fixed thread count (--threads N), or a governor that follows the machine's load (threads.py)."""
    if device.type != "cpu":
        return None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        return None
    return ThreadGovernor(log=log)


def _require_space(run_dir: Path, cfg: TrainConfig, model: nn.Module) -> None:
    """A checkpoint and its predecessor (weights + optimizer state + lookahead copy), final weights, reports."""
    per_copy = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    copies = 2 * (2 + (cfg.optimizer == "adam") + cfg.lookahead + bool(cfg.ema)) + 1
    files.require_space(run_dir, per_copy * copies + 2**25, "this run's checkpoints")


def _sync_bn(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> nn.Module:
    """--sync-bn: BatchNorm statistics over the global batch rather than each rank's share."""
    if not (cfg.sync_bn and world.distributed):
        return model
    if device.type != "cuda":
        raise CnnlabError("--sync-bn needs CUDA devices: PyTorch's DistributedDataParallel refuses "
                          "SyncBatchNorm in CPU processes")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# ---------------------------------------------------------------------------------------------------
# What trains, and the wrapper around it


def set_trainable(model: nn.Module, cfg: TrainConfig, epoch: int) -> None:
    """The parameters that train in `epoch`: the head alone during --freeze-epochs (a frozen body gets no
    gradients, so the optimizer leaves it and its state alone); airbench's whitening bias only for its first
    epochs."""
    if cfg.freeze_epochs:
        finetune.freeze_body(model, finetune.body_frozen(cfg, epoch))
    if cfg.whiten_bias_epochs is not None and hasattr(model, "whiten") and not finetune.body_frozen(cfg, epoch):
        model.whiten.bias.requires_grad_(epoch < cfg.whiten_bias_epochs)


def _wrap(loop: Loop, model: nn.Module) -> None:
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
    if loop.forward is not None and [id(p) for p in trained] == [id(p) for p in loop.trained]:
        return
    _release(loop)
    forward = model
    if loop.world.distributed:
        forward = DDP(model, device_ids=[loop.device] if loop.device.type == "cuda" else None)
    loop.forward = torch.compile(forward) if loop.cfg.compile else forward
    loop.trained = trained


def _release(loop: Loop) -> None:
    """Free the current wrapper now, while the process group lives. DDP's reducer sits in reference cycles,
    so it would otherwise be freed by a later garbage collection, possibly at exit after the process group
    was destroyed. (A two-process run whose wrapper had been rebuilt ended once in CI with one rank aborting
    at exit, "terminate called without an active exception"; 16 runs here did not repeat it, so this is
    the likely cause removed, not a proven one.)"""
    if loop.forward is not None:
        loop.forward = None
        if loop.world.distributed:  # one process holds no reducer; a full collection costs 0.06 s
            gc.collect()


# ---------------------------------------------------------------------------------------------------
# One step, one epoch, the end of an epoch


def _train_step(loop: Loop, ts: TrainState, xb: torch.Tensor, yb: torch.Tensor, step: int) -> None:
    """Forward, backward and update, with no host read; a non-finite step leaves the weights as they were."""
    guarded = list(ts.model.buffers()) if loop.cfg.on_nan == "skip-batch" else []  # BatchNorm statistics
    saved = [b.clone() for b in guarded]
    ts.optimizer.zero_grad(set_to_none=True)
    loss, correct = _forward_backward(loop, ts, xb, yb)
    bad = ~torch.isfinite(loss)
    if loop.cfg.clip_grad:  # on the true gradients: unscaled first when fp16 scales them
        ts.scaler.unscale_(ts.optimizer)
        torch.nn.utils.clip_grad_norm_(loop.trained, loop.cfg.clip_grad, foreach=True)
    if not ts.scaler.is_enabled():  # (GradScaler finds non-finite gradients itself, and expects them)
        if loop.world.distributed:  # the averaged gradients are the same on every rank: so is the decision
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in loop.trained]))
        ts.optimizer.found_inf = bad.float()  # the optimizer skips its update on the device when set
        ts.optimizer.step()
    else:
        ts.scaler.step(ts.optimizer)
        ts.scaler.update()
    ts.schedule.step()  # every step, skipped or not: the schedule stays aligned with the step count
    for b, s in zip(guarded, saved, strict=True):
        b.copy_(torch.where(bad, s, b))
    if ts.lookahead is not None:
        ts.lookahead.step(ts.model, ts.epoch * loop.steps_per_epoch + step + 1, skip=bad)
    if ts.ema is not None:
        ts.ema.update(ts.model)
    ts.add(loss, correct, len(yb), bad, step)


def _forward_backward(loop: Loop, ts: TrainState, xb: torch.Tensor, yb: torch.Tensor) -> tuple:
    """The batch's loss (its mean) and correct count, its gradients added to the parameters': in one pass, or
    in --accumulate slices (under DDP the gradients are exchanged once, after the last slice)."""
    slices = loop.cfg.accumulate
    loss_sum, correct = 0, 0
    for i, (xs, ys) in enumerate(zip(xb.chunk(slices), yb.chunk(slices), strict=True)):
        quiet = loop.world.distributed and i < slices - 1 and hasattr(loop.forward, "no_sync")
        with loop.forward.no_sync() if quiet else contextlib.nullcontext():
            with autocast(loop.device, loop.dtype):
                logits = loop.forward(xs)
                loss = F.cross_entropy(logits.float(), ys, weight=loop.class_weight,
                                       label_smoothing=loop.cfg.label_smoothing)
            if slices > 1:
                loss = loss * (len(ys) / len(yb))  # the slices' means add up to the batch's mean
            ts.scaler.scale(loss).backward()
        loss_sum = loss_sum + loss.detach()
        correct = correct + (logits.argmax(1) == (ys.argmax(1) if ys.ndim == 2 else ys)).sum()
    return loss_sum, correct


def _run_epoch(loop: Loop, ts: TrainState) -> None:
    """The epoch's steps from `ts.step` on: shuffle, augment, step; look at the host every SYNC_EVERY steps."""
    cfg, world = loop.cfg, loop.world
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + ts.epoch)
    perm = torch.randperm(len(loop.y_train), generator=g).to(loop.device)
    if ts.step:
        g.set_state(ts.epoch_rng)
    aug, mixing = augment.get(cfg.augment), augment.mixers(cfg.augment)
    bar = tqdm(total=loop.steps_per_epoch, initial=ts.step, desc=f"Epoch {ts.epoch + 1}/{cfg.epochs}", unit="step",
               leave=False, dynamic_ncols=True, disable=None if world.main else True)
    t0, shown = time.perf_counter() - ts.seconds, ts.step
    for step in range(ts.step, loop.steps_per_epoch):
        idx = dist.shard(world, perm[step * cfg.batch_size:(step + 1) * cfg.batch_size])
        if len(idx):  # a last batch smaller than the world is the same on every rank, so all skip it
            xb, yb = aug(ts.norm(loop.x_train[idx]), g, epoch=ts.epoch, idx=idx, norm=ts.norm), loop.y_train[idx]
            if mixing:  # MixUp/CutMix: the labels become class probabilities
                xb, yb = mix.mix(mixing, xb, yb, g, loop.ds.num_classes)
            _train_step(loop, ts, xb.contiguous(memory_format=torch.channels_last), yb, step)
        else:
            ts.schedule.step()
        ts.step, ts.seconds = step + 1, time.perf_counter() - t0
        last = ts.step == loop.steps_per_epoch
        stop = STOP.is_set() if not world.distributed else False  # one process: a free host-side look
        if ts.step % SYNC_EVERY == 0 or last or stop:
            stop = _sync(loop, ts, bar, ts.step - shown) or stop
            shown = ts.step
        if stop and not last:  # after the last step the epoch ends first (validation, checkpoint)
            bar.close()
            _checkpoint(loop, ts, g)
            raise Interrupted(loop.run_dir)
        if cfg.checkpoint_every and ts.step % cfg.checkpoint_every == 0 and not last:
            _sync(loop, ts, None, 0)  # never checkpoint a state after a non-finite step under --on-nan stop
            _checkpoint(loop, ts, g)
    bar.close()


def _sync(loop: Loop, ts: TrainState, bar, steps: int) -> bool:
    """The host's look at the device: progress, the non-finite check, the thread count, and whether to stop."""
    totals = ts.read()
    if totals["skipped"] and loop.cfg.on_nan == "stop":
        if bar is not None:
            bar.close()
        where = f"epoch {ts.epoch + 1}, step {totals['first_bad_step'] + 1}"
        raise EveryProcessError(f"the loss became non-finite at {where}; training stopped and the last good checkpoint "
                          f"in {loop.run_dir} is kept. Try a lower learning rate (e.g. --lr {loop.cfg.lr / 10:g}), "
                          "or --on-nan skip-batch")
    if loop.trackers is not None and totals["seen"]:  # process 0's share: the running means of the epoch so far
        loop.trackers.step(ts.epoch * loop.steps_per_epoch + ts.step, {
            "train_loss": totals["loss"] / totals["seen"], "train_acc": totals["correct"] / totals["seen"],
            "lr": ts.optimizer.param_groups[0]["lr"]})
    if bar is not None and steps:
        seen = max(totals["seen"], 1)
        bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}", acc=f"{totals['correct'] / seen:.4f}",
                        img_s=f"{totals['seen'] / max(ts.seconds, 1e-9):,.0f}", refresh=False)
        bar.update(steps)
    if loop.governor is not None:
        loop.governor.tick()
    return dist.any_rank(loop.world, STOP.is_set(), loop.device)  # torchrun signals each rank at its own moment


def _checkpoint(loop: Loop, ts: TrainState, g: torch.Generator | None) -> None:
    """Every rank calls this (the totals are summed over ranks); rank 0 writes the file."""
    ts.epoch_rng = g.get_state() if g is not None else None
    state = ts.state_dict(loop.world)
    if loop.world.main:
        checkpoints.save_checkpoint(loop.run_dir, state)


def _end_epoch(loop: Loop, ts: TrainState) -> None:
    """Validate, record the epoch in the history, checkpoint, and say how it went."""
    cfg, epoch = loop.cfg, ts.epoch
    last = epoch == cfg.epochs - 1
    t0 = time.perf_counter()
    if loop.bn_sample is not None and not finetune.body_frozen(cfg, epoch):  # (a frozen body keeps its own)
        batchnorm.recompute(ts.evaluated, loop.x_train[loop.bn_sample.to(loop.device)], ts.norm, loop.device,
                            loop.dtype, loop.bn_batch)
    val_loss, val_acc, logits = _validate(ts.evaluated, loop, ts.norm, last)
    if last and loop.ds.y_val is None:  # the final weights on the test set, with TTA: what the run's
        loop.test_logits = dist.gather_shards(loop.world, logits)  # evaluation would otherwise compute again
    val_seconds = time.perf_counter() - t0
    t = ts.read()
    loss, correct, seen = dist.all_sum(loop.world, [t["loss"], t["correct"], t["seen"]], loop.device)
    skipped = t["skipped"]  # the same steps on every rank: not summed
    record = {"epoch": epoch + 1, "train_loss": loss / max(seen, 1), "train_acc": correct / max(seen, 1),
              "val_loss": val_loss, "val_acc": val_acc, "seconds": round(ts.seconds, 3),
              "images_per_s": round(seen / max(ts.seconds, 1e-9), 1), "val_seconds": round(val_seconds, 3)}
    ts.history.append(record)
    if loop.world.main:
        runs.write_history(loop.run_dir, ts.history)
    if loop.trackers is not None:
        loop.trackers.epoch(record, ts.optimizer.param_groups[0]["lr"])
    if hasattr(ts.schedule, "epoch_end"):  # plateau: the learning rate follows the monitored value
        ts.schedule.epoch_end(record[cfg.monitor])
    stop = _track_best(loop, ts, record)
    ts.epoch, ts.step = (cfg.epochs if stop else epoch + 1), 0  # stopping early ends the run here, for resume too
    ts.reset_totals()
    _checkpoint(loop, ts, None)
    loop.log(f"Epoch {epoch + 1}/{cfg.epochs} - {record['seconds']:.1f}s - {record['images_per_s']:,.0f} img/s - "
             f"loss {record['train_loss']:.4f} - acc {record['train_acc']:.4f} - "
             f"val_loss {val_loss:.4f} - val_acc {val_acc:.4f} - validation {val_seconds:.1f}s")
    if stop:
        loop.log(f"early stopping: {cfg.monitor} has not improved for {cfg.early_stopping} epoch"
                 f"{'s' * (cfg.early_stopping != 1)} (best: epoch {ts.best['epoch']}); training ends here")
    if skipped:
        loop.log(f"warning: {int(skipped)} batches of epoch {epoch + 1} were skipped (non-finite loss)")
    _warn_at_chance(loop, record)


def _warn_at_chance(loop: Loop, record: dict) -> None:
    """Training accuracy that climbs while validation stays at chance (the share of the largest class) means
    held-out images are all given one class: say so once, with the usual causes."""
    y = loop.ds.validation[1]
    chance = torch.bincount(y, minlength=loop.ds.num_classes).max().item() / max(len(y), 1)
    if loop.warned_chance or record["epoch"] < 2 or record["val_acc"] > chance + 0.02 \
            or record["train_acc"] < chance + (1 - chance) / 3:
        return
    loop.warned_chance = True
    loop.log(f"warning: validation accuracy {record['val_acc']:.1%} is at chance ({chance:.1%}, the largest "
             f"class's share) while training accuracy reached {record['train_acc']:.1%}: held-out images all get "
             "nearly one class. Check that validation images are labelled and prepared as the training ones are; "
             "a learning rate too high for the network (--lr) or too few images for it (a smaller --model, or "
             "--pretrained weights) are the usual causes")


def _track_best(loop: Loop, ts: TrainState, record: dict) -> bool:
    """Keep the best epoch's weights (best.safetensors) and count the epochs since; True: stop early."""
    cfg, value = loop.cfg, record[loop.cfg.monitor]
    if improves(value, ts.best.get("value"), lower_is_better=cfg.monitor == "val_loss"):
        ts.best = {"epoch": record["epoch"], "value": value, "since": 0}
        if loop.world.main:
            checkpoints.save_best(loop.run_dir, ts.evaluated, record["epoch"])
    else:
        ts.best["since"] += 1
    return bool(cfg.early_stopping) and ts.best["since"] >= cfg.early_stopping and record["epoch"] < cfg.epochs


def _keep(loop: Loop, ts: TrainState) -> int:
    """Put the weights the run keeps into the model (rank 0); say which and why; return their epoch."""
    cfg, last = loop.cfg, ts.history[-1]["epoch"] if ts.history else 0
    rule = checkpoints.keep_rule(cfg, loop.ds.y_val is not None)
    if not ts.best:
        return last
    kept = ts.best["epoch"] if rule == "best" else last
    if kept != last and loop.world.main:
        weights, epoch = checkpoints.load_best(loop.run_dir)
        ts.model.load_state_dict(weights)
        loop.test_logits = None  # those were the last epoch's: the final evaluation runs on the kept weights
    why = {"last": "--keep last" if cfg.keep == "last" else "the validation set is the test set",
           "best": "--keep best" if cfg.keep == "best" else
           "early stopping" if cfg.early_stopping else "validated on held-out images"}[rule]
    loop.log(f"best epoch: {ts.best['epoch']} ({cfg.monitor} {ts.best['value']:.4f}); model.safetensors holds "
             f"epoch {kept}'s weights ({rule}: {why})")
    return kept


def _validate(model: nn.Module, loop: Loop, norm: Normalization, last: bool) -> tuple[float, float, torch.Tensor]:
    """Loss, accuracy and logits on the validation set (or its fixed sample, --val-sample, before the last
    epoch), each rank taking its share (summed, not repeated), and this rank's logits of its share."""
    x, y = loop.ds.validation
    if loop.val_sample is not None and not last:
        x, y = x[loop.val_sample], y[loop.val_sample]
    tta = loop.cfg.tta if last else 0  # test-time augmentation multiplies the cost: only for the final weights
    x, y = dist.shard(loop.world, x), dist.shard(loop.world, y)
    logits = evaluate.predict_logits(model, x, norm, loop.device, loop.dtype, loop.cfg.eval_batch_size, tta=tta)
    loss = F.cross_entropy(logits, y, reduction="sum").item() if len(y) else 0.0
    correct = (logits.argmax(1) == y).sum().item() if len(y) else 0
    loss_sum, correct, count = dist.all_sum(loop.world, [loss, correct, len(y)], loop.device)
    return loss_sum / max(count, 1), correct / max(count, 1), logits


# ---------------------------------------------------------------------------------------------------
# fit: the whole loop


def fit(run_dir: Path, cfg: TrainConfig, ds: Dataset, state: dict | None, log,
        world: World = World(), trackers: tracking_mod.Trackers | None = None) -> torch.Tensor | None:
    """Train from scratch (`state` None) or from a checkpoint's state to the end; rank 0 saves the model.
    Returns the final weights' test-set logits when the last validation computed them (else None)."""
    ts, loop = _build(run_dir, cfg, ds, state, log, world)
    loop.trackers = trackers
    log(f"training {cfg.model} ({models.count_params(ts.model):,} parameters) on {len(ds.y_train):,} images, "
        f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)} of {loop.steps_per_epoch} steps; device {loop.device}, "
        f"{precision_name(loop.dtype)}; {_lr_words(cfg)}"
        + (f"; {world.size} processes of {dist.per_rank_batch(world, cfg.batch_size)} images a step"
           if world.distributed else ""))
    try:
        with _ctrl_c_requests_stop():
            while ts.epoch < cfg.epochs:
                set_trainable(ts.model, cfg, ts.epoch)
                _wrap(loop, ts.model)
                ts.model.train()
                finetune.freeze_norms(ts.model, finetune.body_frozen(cfg, ts.epoch))
                _run_epoch(loop, ts)
                _end_epoch(loop, ts)
                if dist.any_rank(world, STOP.is_set(), loop.device):
                    raise Interrupted(run_dir)
    finally:
        _release(loop)
    if ts.ema is not None:  # the run's weights are the average from here on (the checkpoint keeps both)
        ts.model.load_state_dict(ts.ema.state_dict())
    kept = _keep(loop, ts)
    if world.main:
        meta = checkpoints.model_meta(cfg, ds, ts.norm, ts.model, loop.dtype, ts.history)
        checkpoints.save_model(run_dir, ts.model, {**meta, "epoch": kept, "best_epoch": ts.best.get("epoch")})
    return loop.test_logits


def _lr_words(cfg: TrainConfig) -> str:
    """The learning rate as the log states it: per-1024 rates say so, with what a step of this batch takes."""
    if not cfg.per_1024:
        return f"lr {cfg.lr:g}"
    return f"lr {cfg.lr:g} per 1024 examples ({step_lr(cfg):.4g} a step at batch {cfg.batch_size})"


@contextlib.contextmanager
def _ctrl_c_requests_stop():
    """While training, the first Ctrl-C (or SIGTERM, which schedulers send before they kill) asks the loop to
    stop and checkpoint; a second one aborts."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\n{what}: stopping after this step and saving a checkpoint ({what} again to abort)", flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------------
# The API: train and resume


def load_data(data_cfg: DataConfig, seed: int, log=say) -> Dataset:
    """The data a run trains on: the data set, its unreadable files reported, --subset applied."""
    ds = data.load(data_cfg)
    if ds.skipped:
        log(f"warning: skipped {len(ds.skipped)} unreadable image file(s) (recorded in config.json): "
            + "; ".join(ds.skipped[:3]) + ("; ..." if len(ds.skipped) > 3 else ""))
    # --val-split was held out by the cache (data.load), before the subset: the held-out images never depend on
    # the training seed, and they are decoded apart rather than copied out of the mapped training set
    return ds.subset(data_cfg.subset, seed) if data_cfg.subset else ds


def _load_once(world: World, load) -> Dataset:
    """The first process of each machine reads the data (building that machine's cache) while the others
    wait; then they read the finished cache. Every rank passes exactly one barrier."""
    if world.local_rank != 0:
        dist.barrier(world)
    ds = load()
    if world.local_rank == 0:
        dist.barrier(world)
    return ds


def _quiet(*args) -> None:
    pass


def _complete(run_dir: Path, ds: Dataset, cfg: TrainConfig, log, with_report: bool) -> Path:
    """A run whose weights are committed and verified: write again whatever of the end of the run is missing
    (a kill or a full disk after the weights), or say that nothing is."""
    wanted = [*END_FILES, *(PICTURES if with_report else [])]
    missing = [name for name in wanted if not (run_dir / name).exists()]
    if not missing:
        log(f"{run_dir} is complete: all {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} trained, its weights verified, "
            f"{', '.join(wanted)} present")
        return run_dir
    log(f"{run_dir} finished training; writing what its end left missing: {', '.join(missing)}")
    return _finish(run_dir, ds, cfg, log, with_report)


def _finish(run_dir: Path, ds: Dataset, cfg: TrainConfig, log, with_report: bool,
            test_logits: torch.Tensor | None = None, trackers: tracking_mod.Trackers | None = None) -> Path:
    """Write metrics, confusion matrix and report of the final weights, say where they are. The test set is
    evaluated here only when training's last validation did not already do it (`test_logits`)."""
    interp = (Interpretation.from_logits(run_dir, ds, test_logits) if test_logits is not None
              else Interpretation.from_run(run_dir, dataset=ds, device=cfg.device))
    result = evaluate.save_metrics(run_dir, interp.logits, interp.y_true, interp.classes, ds.source, with_report)
    log(evaluate.format_metrics(result))
    outputs = ["model.safetensors", "metrics.json", "history.csv"]
    if with_report:
        report.write_report(run_dir, interp)
        outputs += PICTURES
    if trackers is not None:
        trackers.finish(run_dir, result, interp.plot_confusion_matrix)  # drawn only if a tracker shows it
    log(f"\nrun directory: {run_dir}")
    for name in outputs:
        log(f"  {name:<22}{run_dir / name}")
    return run_dir


@keeps_thread_count
def train(cfg: TrainConfig, data_cfg: DataConfig | None = None, *, preset: str = "custom",
          out: str | Path | None = None, runs_root: str | Path = "runs", dataset: Dataset | None = None,
          with_report: bool = True, log=say, tracking: tuple[str, ...] = (), mlflow_uri: str | None = None) -> Path:
    """Train, evaluate and return the run directory. `dataset` skips loading (already in memory); `tracking`
    names experiment trackers ("tensorboard", "mlflow": see tracking.py).

    Under torchrun every process calls this; rank 0 alone writes the run directory and prints.
    """
    cfg.validate()  # before any data is read or any directory made: a typo leaves nothing behind
    tracking_mod.check(list(tracking))
    data_cfg = input_size(cfg, (data_cfg or DataConfig()).validate(), log)
    pick_device(cfg.device)
    finetune.check_start(cfg, data_cfg.image_size, log)  # the download (or offline error), whether the file fits
    if data_cfg.image_size:  # known before the data: a size the model cannot take costs no decoding
        models.check_size(cfg.model, 3, data_cfg.image_size)
    if cfg.init_from:
        runs.read_json(Path(cfg.init_from) / "model.json", "--init-from needs a finished training run")
    world = dist.init()
    dist.per_rank_batch(world, cfg.batch_size)
    if world.main and out is not None:
        _check_out(Path(out))  # before the data is read: a wrong --out costs nothing
    log = log if world.main else _quiet
    ds = dataset or _load_once(world, lambda: load_data(data_cfg, cfg.seed, log))
    if len(ds.y_train) == 0:
        raise CnnlabError(f"{ds.source} has no training images")
    created = out is None or not Path(out).exists()
    run_dir = _new_run_dir(out, runs_root, preset) if world.main else None
    run_dir = Path(dist.broadcast(world, str(run_dir) if run_dir else None))
    try:
        if world.main:
            _write_config(run_dir, cfg, data_cfg, ds, preset, world,
                          {"report": with_report, "tracking": list(tracking), "mlflow_uri": mlflow_uri})
            log(f"run directory: {run_dir}")
        trackers = _trackers(run_dir, world)
        logits = (probe.fit_head if cfg.head_only else fit)(run_dir, cfg, ds, None, log, world, trackers=trackers)
    except CnnlabError:
        if world.main:
            _discard(run_dir, created)
        raise
    return _finish(run_dir, ds, cfg, log, with_report, logits, trackers) if world.main else run_dir


def input_size(cfg: TrainConfig, data_cfg: DataConfig, log) -> DataConfig:
    """Pretrained weights bring their input size unless --image-size says otherwise: ImageNet's 224 px, or
    the size a cnnlab run's weights were trained at (its model.json)."""
    if not cfg.pretrained or data_cfg.image_size:
        return data_cfg
    if cfg.pretrained == "imagenet":
        size, where = (pretrained.IMAGENET[cfg.model].size,) * 2, f"{cfg.model}'s ImageNet weights were"
    elif meta := pretrained.run_meta(cfg.pretrained):
        run = pretrained.source_path(cfg.model, cfg.pretrained).parent
        size, where = tuple(meta["image_size"]), f"the weights' run {run} was"
    else:
        return data_cfg
    log(f"input size {size[0]}x{size[1]}, as {where} trained (--image-size to change it)")
    return replace(data_cfg, image_size=size)


def _trackers(run_dir: Path, world: World) -> tracking_mod.Trackers | None:
    """Process 0's experiment trackers, as the run's config.json asks (None when it asks for none)."""
    if not world.main:
        return None
    config = runs.read_config(run_dir)
    outputs = config.get("outputs", {})
    kinds = outputs.get("tracking") or []
    return tracking_mod.Trackers(run_dir, kinds, config, outputs.get("mlflow_uri")) if kinds else None


def _check_out(out: Path) -> None:
    """--out must be new, or an empty folder: never a run (that is --resume) nor a folder of other files."""
    if (out / "config.json").exists():
        raise CnnlabError(f"{out} already holds a run; use --resume {out} or another --out")
    if out.is_dir() and any(out.iterdir()):
        raise CnnlabError(f"{out} is a folder of other files, not a cnnlab run; choose a new or empty --out")
    if out.exists() and not out.is_dir():
        raise CnnlabError(f"--out {out} is a file; choose a new or empty folder")


def _discard(run_dir: Path, created: bool) -> None:
    """A run refused before its first checkpoint (no disk space, a non-finite first step, ...) leaves nothing:
    the same command can then simply be run again."""
    if any((run_dir / name).exists() for name in (checkpoints.CHECKPOINT, checkpoints.PREVIOUS)):
        return  # it trained: --resume continues it
    for name in ("config.json", "history.csv", "history.json"):
        (run_dir / name).unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only when nothing else is in it


def _new_run_dir(out: str | Path | None, runs_root: str | Path, preset: str) -> Path:
    try:
        if out is not None:
            run_dir = Path(out)  # (checked by _check_out before the data was read)
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = runs.new_run_dir(runs_root, preset)
    except OSError as e:
        raise CnnlabError(f"cannot create the run directory {out or runs_root}: {e.strerror or e}") from None
    return run_dir


def _write_config(run_dir: Path, cfg: TrainConfig, data_cfg: DataConfig, ds: Dataset, preset: str,
                  world: World, outputs: dict) -> None:
    config = {"preset": preset, "train": asdict(cfg), "outputs": outputs,
              "data": {**asdict(data_cfg), "path": ds.source, "format": ds.format, "split": ds.split,
                       "classes": ds.classes, "train_images": len(ds.y_train), "test_images": len(ds.y_test),
                       "val_images": len(ds.y_val) if ds.y_val is not None else None,
                       "skipped_images": list(ds.skipped),
                       "validation": validation_words(data_cfg, ds)},
              "environment": _environment(cfg, world)}
    files.write_json(run_dir / "config.json", config)


def validation_words(data_cfg: DataConfig, ds: Dataset) -> str:
    """Where the run's validation images come from, as config.json and the report say it."""
    if ds.y_val is None:
        return "the test set (as the tutorial does)"
    if data_cfg.val_split is None:  # the data's own validation split: a val/ (valid/, validation/) folder
        return f"the data's own validation split, {len(ds.y_val)} images"
    return (f"stratified {data_cfg.val_split:.0%} of the training images (seed {data_cfg.split_seed}), "
            f"{len(ds.y_val)} images")


def _environment(cfg: TrainConfig, world: World) -> dict:
    """Where and when the run was trained, for the report (not where the report is later written)."""
    device = pick_device(cfg.device)
    return {"started": time.strftime("%Y-%m-%d %H:%M"), "cnnlab": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": hardware.cpu_model(),
            "cpu class": hardware.cpu_class(), "threads": torch.get_num_threads(), "device": str(device),
            "processes": world.size, "precision": precision_name(pick_precision(cfg.precision, device))}


def _read_run(run_dir: Path, world: World, log) -> tuple[dict, dict | None, bool]:
    """Rank 0 reads the run's config, newest intact checkpoint and whether it has its final weights."""
    config, state, finished = None, None, False
    if world.main:  # only rank 0's machine need hold the run directory
        config = runs.read_config(run_dir)
        for leftover in run_dir.glob(".*.tmp"):  # a write that a kill cut short; never a file anything reads
            leftover.unlink(missing_ok=True)
        state = checkpoints.load_checkpoint(run_dir, log)
        finished = checkpoints.model_complete(run_dir)  # committed and intact; else written again from the state
    return dist.broadcast(world, (config, state, finished))


def _extend(run_dir: Path, config: dict, cfg: TrainConfig, state: dict | None, epochs: int, world: World,
            log) -> TrainConfig:
    """`--resume RUN --epochs N`: the run continues to N epochs, as if it had been started with N."""
    done = len(state["history"]) if state else 0
    if cfg.schedule not in ("constant", "plateau") or cfg.warmup:  # a warm-up is a share of all the steps too
        shape = f"a {cfg.warmup:g} warm-up" if cfg.schedule in ("constant", "plateau") else f"a {cfg.schedule}"
        raise CnnlabError(f"{run_dir} follows {shape} learning-rate schedule, whose shape depends "
                          f"on the number of epochs, so it cannot be extended; start a new run from its weights: "
                          f"cnnlab train --init-from {run_dir} --epochs N ...")
    if state is not None and done < state["epoch"]:
        raise CnnlabError(f"{run_dir} stopped early at epoch {done} (--early-stopping); start a new run from its "
                          f"weights to train further: cnnlab train --init-from {run_dir} ...")
    if epochs < done:
        raise CnnlabError(f"{run_dir} has already trained {done} epochs; --epochs must be at least that")
    if world.main:
        files.write_json(run_dir / "config.json", {**config, "train": {**config["train"], "epochs": epochs}})
    log(f"{run_dir}: {cfg.epochs} -> {epochs} epochs")
    return replace(cfg, epochs=epochs)


@keeps_thread_count
def resume(run_dir: str | Path, data_path: str | None = None, *, with_report: bool = True, log=say,
           epochs: int | None = None) -> Path:
    """Continue an interrupted run from its last checkpoint; the result equals an uninterrupted run. With
    `epochs`, a run on a constant schedule is extended (or an unfinished one shortened) to that many epochs.

    The checkpoint holds the global state, so a run may resume under another number of processes.
    """
    world = dist.init()
    log = log if world.main else _quiet
    run_dir = Path(run_dir)
    config, state, finished = _read_run(run_dir, world, log)
    cfg = from_dict(TrainConfig, config["train"]).validate()
    if epochs is not None and epochs != cfg.epochs:
        cfg = _extend(run_dir, config, cfg, state, epochs, world, log)
        finished = False
    data_cfg = from_dict(DataConfig, {**config["data"], **({"path": data_path} if data_path else {})})
    ds = _load_once(world, lambda: load_data(data_cfg, cfg.seed, log))
    if ds.classes != config["data"]["classes"]:
        raise CnnlabError(f"the data at {ds.source} has other classes than the run was trained on")
    if finished and (cfg.head_only or state is not None and state["epoch"] >= cfg.epochs):  # (probes: no checkpoints)
        if not world.main:  # process 0 alone checks and writes the run directory
            return run_dir
        return _complete(run_dir, ds, cfg, log, with_report and config.get("outputs", {}).get("report", True))
    if state is None:
        log(f"{run_dir} has no checkpoint yet (it stopped before the first one): starting from the beginning")
    else:
        log(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    trackers = _trackers(run_dir, world)
    logits = (probe.fit_head if cfg.head_only else fit)(run_dir, cfg, ds, state, log, world, trackers=trackers)
    return _finish(run_dir, ds, cfg, log, with_report, logits, trackers) if world.main else run_dir
