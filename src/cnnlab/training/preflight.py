"""The preflight: every check that needs no data, run once, before any data is read or any directory made,
resolved into a `Plan` that the build uses. A typo, an unknown name, weights that do not fit, a size the
network cannot take or an --out that is already a run costs nothing and leaves nothing behind.

    plan = preflight(cfg, data_cfg, out="runs/x")    # also starts torch.distributed under torchrun
    plan.device, plan.dtype, plan.data.image_size, plan.world
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cnnlab import dist, models
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.data import augment
from cnnlab.device import configure, pick_device, pick_precision
from cnnlab.dist import World
from cnnlab.models import pretrained
from cnnlab.run import Run
from cnnlab.training import finetune, tracking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What a run is, resolved: its settings, the input size, where it runs and in what precision."""
    cfg: TrainConfig
    data: DataConfig
    world: World
    device: torch.device  # this process's device (cuda:<local rank> under torchrun on GPUs)
    dtype: torch.dtype


def check_names(cfg: TrainConfig) -> TrainConfig:
    """The settings' values (config.py) and the names that live in registries: the model (or layer spec), the
    augmentation, the pretrained weights."""
    cfg.validate()
    augment.get(cfg.augment)
    models.check(cfg.model)
    pretrained.check(cfg.model, cfg.pretrained)
    return cfg


def preflight(cfg: TrainConfig, data_cfg: DataConfig | None = None, *, out: str | Path | None = None,
              tracking_kinds: tuple[str, ...] = (), resuming: bool = False) -> Plan:
    """Check everything that can be checked before the data, once; start the process group under torchrun."""
    check_names(cfg) if not resuming else cfg.validate()  # (a resumed run's names were checked when it began)
    tracking.check(list(tracking_kinds))
    data_cfg = (data_cfg or DataConfig()).validate()
    device = pick_device(cfg.device)
    if not resuming:
        data_cfg = input_size(cfg, data_cfg)
        finetune.check_start(cfg, data_cfg.image_size)  # the download (or offline error), whether the file fits
        if data_cfg.image_size:  # known before the data: a size the model cannot take costs no decoding
            models.check_size(cfg.model, 3, data_cfg.image_size)
        if cfg.init_from:
            Run(cfg.init_from).read_json(Run.META, "--init-from needs a finished training run")
    world = dist.init(cfg.device)
    dist.per_rank_batch(world, cfg.batch_size)
    if world.main and out is not None:
        Run.check_out(out)  # before the data is read: a wrong --out costs nothing
    device = dist.device_for(world, device)
    configure(device)
    return Plan(cfg, data_cfg, world, device, pick_precision(cfg.precision, device))


def input_size(cfg: TrainConfig, data_cfg: DataConfig) -> DataConfig:
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
    log.info(f"input size {size[0]}x{size[1]}, as {where} trained (--image-size to change it)")
    return replace(data_cfg, image_size=size)
