"""The weights a run keeps: the best epoch's or the last (`keep_rule`), put into the model (`keep`), as CPU
tensors (`cpu_weights`), described by model.json (`model_meta`), with the temperature that calibrates them
(`calibrate`, fitted on the held-out images: evaluation/calibration.py)."""

from __future__ import annotations

import logging

import torch

from cnnlab import models
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import Dataset
from cnnlab.device import precision_name
from cnnlab.evaluation import calibration, evaluate
from cnnlab.run import Run
from cnnlab.training.preflight import Plan
from cnnlab.training.state import TrainState

log = logging.getLogger(__name__)


def keep(plan: Plan, ds: Dataset, run: Run, ts: TrainState) -> int:
    """Put the weights the run keeps into the model (process 0); say which and why; return their epoch."""
    cfg, last = plan.cfg, ts.history[-1]["epoch"] if ts.history else 0
    rule = keep_rule(cfg, ds.y_val is not None)
    if not ts.best:
        return last
    kept = ts.best["epoch"] if rule == "best" else last
    if kept != last and plan.world.main:
        weights, _ = run.load_best()
        ts.model.load_state_dict(weights)
    why = {"last": "--keep last" if cfg.keep == "last" else "the validation set is the test set",
           "best": "--keep best" if cfg.keep == "best" else
           "early stopping" if cfg.early_stopping else "validated on held-out images"}[rule]
    log.info(f"best epoch: {ts.best['epoch']} ({cfg.monitor} {ts.best['value']:.4f}); model.safetensors holds "
             f"epoch {kept}'s weights ({rule}: {why})")
    return kept


def keep_rule(cfg: TrainConfig, held_out: bool) -> str:
    """Which weights model.safetensors gets ("best" or "last"): `auto` keeps the best epoch's when validating on
    held-out images or stopping early."""
    if cfg.keep != "auto":
        return cfg.keep
    return "best" if cfg.early_stopping or held_out else "last"


def model_meta(cfg: TrainConfig, ds: Dataset, norm, model: torch.nn.Module, dtype: torch.dtype,
               history: list[dict]) -> dict:
    """model.json: what predict, export and serve need to rebuild and feed the network as it was trained."""
    return {"model": cfg.model, "classes": ds.classes, "in_channels": ds.channels,
            "image_size": list(ds.image_size), "resize": ds.resize or "squish", "normalization": norm.to_dict(),
            "params": models.count_params(model), "precision": precision_name(dtype), "tta": cfg.tta,
            "epochs": cfg.epochs, "train_seconds": round(sum(h["seconds"] for h in history), 3),
            "pretrained": cfg.pretrained}


def cpu_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's state as contiguous CPU tensors: what a weights file holds."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def calibrate(plan: Plan, ds: Dataset, model: torch.nn.Module, norm, held_logits: torch.Tensor | None) -> tuple[
        dict, torch.Tensor]:
    """model.json's calibration record, fitted on the kept weights' logits of the validation set (the test set
    where there is none: cross-fitted, calibration.py), computed here unless the last validation's are those.
    Returns the record and the held-out logits."""
    x, y = ds.validation
    if held_logits is None:
        held_logits = evaluate.predict_logits(model, x, norm, plan.device, plan.dtype, plan.cfg.eval_batch_size,
                                              tta=plan.cfg.tta)
    record = calibration.fit(held_logits, y, "validation" if ds.y_val is not None else "test")
    where = "validation set" if ds.y_val is not None else "test set (the only held-out images; cross-fitted)"
    log.info(f"calibration: temperature {record['temperature']:.3f}, fitted on the {where}")
    return record, held_logits
