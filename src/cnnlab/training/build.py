"""What a run starts from: the model, its optimizer and schedule (`TrainState`), the `Step`, the `Batches`,
and the hooks that extend the loop, built from a `Plan` (preflight.py) and a data set.

    ts, step, batches = build(plan, ds, state)          # state: a checkpoint's, or None for a new run
    hooks = default_hooks(plan, ds, run, batches, ts)

Everything is seeded: the same seed gives the same initial weights on every process.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cnnlab import dist, files, models
from cnnlab.config import TrainConfig
from cnnlab.data import loader
from cnnlab.data.dataset import Dataset, Normalization, class_weights, stratified_pick
from cnnlab.device import keep_freed_memory, precision_warning
from cnnlab.dist import World
from cnnlab.errors import CnnlabError
from cnnlab.run import Run
from cnnlab.training import batchnorm, finetune, hooks
from cnnlab.training.optim import EMA, Lookahead, make_optimizer, make_schedule
from cnnlab.training.preflight import Plan
from cnnlab.training.state import TrainState
from cnnlab.training.step import Step
from cnnlab.training.threads import ThreadGovernor

log = logging.getLogger(__name__)


def build(plan: Plan, ds: Dataset, state: dict | None, run: Run | None = None
          ) -> tuple[TrainState, Step, loader.Batches]:
    """The state to train (from scratch, or a checkpoint's `state`), the step, and the batches."""
    cfg, device = plan.cfg, plan.device
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same seed on every rank: identical initial weights
    model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size).to(device)
    model = model.to(memory_format=torch.channels_last)  # oneDNN and cuDNN convolutions run faster in NHWC
    for warning in (models.size_warning(model, ds.image_size), precision_warning(plan.dtype, device)):
        if warning and state is None:
            log.info(warning)
    norm = finetune.normalization(cfg, ds, state)
    if run is not None and plan.world.main:
        require_space(run, cfg, model)
    steps_per_epoch = -(-len(ds.y_train) // cfg.batch_size)
    if state is None:
        init_from_data(model, ds, norm, cfg.seed, device)
        finetune.start_from(model, cfg)  # --init-from, --pretrained
    ts = train_state(cfg, sync_bn(model, cfg, plan.world, device), norm, device, plan.dtype,
                     steps_per_epoch * cfg.epochs, cfg.freeze_epochs * steps_per_epoch)
    if state is not None:
        ts.load_state_dict(state, plan.world)
    step = Step(cfg, device, plan.dtype, steps_per_epoch, plan.world, class_weight(cfg, ds, device))
    batches = loader.Batches(ds.x_train, ds.y_train, batch_size=cfg.batch_size, seed=cfg.seed, augment=cfg.augment,
                             norm=ts.norm, num_classes=ds.num_classes, world=plan.world, device=device,
                             stream=cfg.stream)
    if batches.stream and not cfg.stream and device.type == "cuda":
        size = ds.x_train.numel() * ds.x_train.element_size()
        log.info(f"the training images ({size / 2**30:.2f} GiB) take over {loader.RESIDENT_SHARE:.0%} of the GPU's "
                 f"free memory: streamed from the host, {loader.AHEAD} batches ahead")
    return ts, step, batches


def default_hooks(plan: Plan, ds: Dataset, run: Run, batches: loader.Batches, ts: TrainState, *,
                  trackers=None, new: bool = True) -> list[hooks.Hook]:
    """The hooks every training run has (hooks.py), in their order."""
    cfg, world = plan.cfg, plan.world
    val_sample = (stratified_pick(ds.validation[1], cfg.val_sample, cfg.seed, ds.num_classes)
                  if 0 < cfg.val_sample < len(ds.validation[1]) else None)
    bn_sample, bn_batch = bn_statistics(plan, ts.model, batches, new)
    governor = thread_governor(cfg, plan.device)
    return [hooks.Progress(world.main), hooks.NonFinite(cfg, run),
            hooks.Validate(cfg, ds, plan.device, plan.dtype, world, val_sample=val_sample, bn_sample=bn_sample,
                           bn_batch=bn_batch),
            hooks.History(run if world.main else None), hooks.Checkpoints(run, world, cfg.checkpoint_every),
            *([hooks.Trackers(trackers)] if trackers is not None else []),
            hooks.Monitor(cfg, run if world.main else None),
            *([hooks.Governor(governor)] if governor is not None else []),
            hooks.EpochLog(cfg, ds), hooks.CtrlC()]


def bn_statistics(plan: Plan, model: nn.Module, batches: loader.Batches, new: bool
                  ) -> tuple[torch.Tensor | None, int]:
    """Where BatchNorm's running averages cannot keep up with an epoch, their exact values are computed before
    each validation (batchnorm.py says why): on which training images, in batches of which size."""
    momenta = batchnorm.lagging(model, batches.steps)
    if not momenta:
        return None, 0
    bn_batch = dist.per_rank_batch(plan.world, plan.cfg.batch_size)  # the statistics training normalizes by
    sample = batchnorm.sample(len(batches.y), bn_batch, plan.cfg.seed)
    if new:
        log.info(f"BatchNorm statistics: computed on {len(sample):,} training images before each validation "
                 f"(momentum {', '.join(f'{m:g}' for m in momenta)} cannot renew the running averages in "
                 f"{batches.steps} steps an epoch)")
    return sample, bn_batch


def init_from_data(model: nn.Module, ds: Dataset, norm: Normalization, seed: int, device: torch.device) -> None:
    """Layers set from the data before training (airbench's whitening layer), from a seeded sample of 5,000
    CIFAR images' worth of pixels: larger images take fewer, so the patch statistics stay bounded."""
    if not hasattr(model, "init_from_data"):
        return
    count = max(64, min(5000, 5000 * 32 * 32 // (ds.image_size[0] * ds.image_size[1])))
    sample = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(seed))[:count]
    model.init_from_data(norm(ds.x_train[sample]).to(device))


def train_state(cfg: TrainConfig, model: nn.Module, norm: Normalization, device: torch.device, dtype: torch.dtype,
                total_steps: int, frozen_steps: int = 0) -> TrainState:
    opt = make_optimizer(cfg, model)  # before any freezing: the optimizer knows every trainable parameter
    return TrainState(model, opt, make_schedule(cfg, opt, total_steps, frozen_steps),
                      torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                      Lookahead(model, total_steps) if cfg.lookahead else None, norm, device,
                      ema=EMA(model, cfg.ema) if cfg.ema else None)


def class_weight(cfg: TrainConfig, ds: Dataset, device: torch.device) -> torch.Tensor | None:
    """--class-weights auto: each class's weight in the training loss, said in the log."""
    if cfg.class_weights != "auto":
        return None
    weights = class_weights(ds.y_train, ds.num_classes)
    shown = ", ".join(f"{name} {w:.2f}" for name, w in zip(ds.classes[:10], weights.tolist(), strict=False))
    log.info(f"class weights (--class-weights auto, the rarer the heavier): {shown}"
             + (f", ... ({ds.num_classes} classes, {weights.min():.2f}-{weights.max():.2f})"
                if ds.num_classes > 10 else ""))
    return weights.to(device)


def thread_governor(cfg: TrainConfig, device: torch.device) -> ThreadGovernor | None:
    """A fixed thread count (--threads N), or a governor that follows the machine's load (threads.py)."""
    if device.type != "cpu":
        return None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        return None
    return ThreadGovernor(say=True)


def require_space(run: Run, cfg: TrainConfig, model: nn.Module) -> None:
    """A checkpoint and its predecessor (weights + optimizer state + lookahead copy), final weights, reports."""
    per_copy = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    copies = 2 * (2 + (cfg.optimizer == "adam") + cfg.lookahead + bool(cfg.ema)) + 1
    files.require_space(run.path, per_copy * copies + 2**25, "this run's checkpoints")


def sync_bn(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> nn.Module:
    """--sync-bn: BatchNorm statistics over the global batch rather than each rank's share."""
    if not (cfg.sync_bn and world.distributed):
        return model
    if device.type != "cuda":
        raise CnnlabError("--sync-bn needs CUDA devices: PyTorch's DistributedDataParallel refuses "
                          "SyncBatchNorm in CPU processes")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
