"""Linear probes (`--head-only`): the frozen body embeds every image once, then only the head trains, on the
embeddings.

On a CPU the embedding pass is the whole cost (one forward pass per image: no backward pass, no augmentation),
so the head's epochs take seconds. The embeddings are cached in <cache>/features/<key>.safetensors, beside
the decoded images, the key a digest of the body's weights, the normalization, the precision and the split's
pixels: a second probe of the same images with the same weights (another learning rate, more epochs) skips
the embedding altogether.

Under several processes each embeds its share of the images; then every process trains the same head on all
of them (it is too small to be worth splitting), and process 0 writes the run. A probe writes no checkpoints:
resuming one runs it again, from its cached embeddings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints, data, dist, evaluate, files, finetune, models, runs, sources
from .config import TrainConfig
from .data import Dataset, Normalization
from .device import autocast, pick_device, pick_precision, precision_name
from .dist import World
from .optim import improves, make_optimizer, make_schedule

IGNORED = ("augment", "ema", "lookahead", "accumulate", "tta")  # settings that act on images or on many steps


class Embedder(nn.Module):
    """The body of a network as a module of its own: images in, the head's input out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def fit_head(run_dir: Path, cfg: TrainConfig, ds: Dataset, state: dict | None, log, world: World = World(),
             trackers=None) -> torch.Tensor | None:
    """Train the head on cached embeddings; save the whole network (rank 0). Returns the test-set logits when
    the validation set is the test set (else None), as train.fit does."""
    cfg = _probe_settings(cfg, log)
    device = dist.device_for(world, pick_device(cfg.device))
    dtype = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size).to(device)
    finetune.start_from(model, cfg, log)
    norm = finetune.normalization(cfg, ds, None)
    head = model.get_submodule(finetune.head_name(model))
    splits = {"train": ds.x_train, "validation": ds.validation[0]}
    if ds.y_val is not None:
        splits["test"] = ds.x_test
    t0 = time.perf_counter()
    feats = {name: embeddings(model, x, norm, device, dtype, cfg.eval_batch_size, world, log)
             for name, x in splits.items()}
    log(f"embedded {sum(len(x) for x in splits.values()):,} images with the frozen {cfg.model} in "
        f"{time.perf_counter() - t0:.1f} s; training its head ({models.count_params(head):,} parameters) "
        f"for {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}")
    history, best = _train_head(head, feats, ds, cfg, device, run_dir if world.main else None, log, trackers)
    kept = history[-1]["epoch"]
    if checkpoints.keep_rule(cfg, ds.y_val is not None) == "best" and best["epoch"] != kept:
        head.load_state_dict(best["weights"])
        kept = best["epoch"]
    log(f"best epoch: {best['epoch']} ({cfg.monitor} {best['value']:.4f}); model.safetensors holds epoch {kept}'s "
        "head")
    if world.main:
        meta = checkpoints.model_meta(cfg, ds, norm, model, dtype, history)
        checkpoints.save_model(run_dir, model, {**meta, "epoch": kept, "best_epoch": best["epoch"], "head_only": True})
    if ds.y_val is not None:
        return None
    with torch.no_grad(), autocast(device, dtype):  # as the whole network computes its head: evaluate agrees
        return head(feats["validation"].to(device)).float().cpu()


def _probe_settings(cfg: TrainConfig, log) -> TrainConfig:
    """What a probe honours: settings that act on images (augmentation, test-time views) or average weights
    over many steps do not apply to cached embeddings, and are said to be left out."""
    defaults = TrainConfig()
    left_out = [name for name in IGNORED if getattr(cfg, name) != getattr(defaults, name)]
    if left_out:
        log(f"--head-only: {', '.join(n.replace('_', '-') for n in left_out)} "
            f"do{'es' * (len(left_out) == 1)} not apply to cached embeddings; left out")
    return replace(cfg, **{name: getattr(defaults, name) for name in IGNORED}, lr_spread=1.0)


def feature_key(model: nn.Module, norm: Normalization, dtype: torch.dtype, x: torch.Tensor) -> str:
    """A digest of everything the embeddings depend on: the body's weights, normalization, precision, pixels."""
    head = finetune.head_name(model)
    h = hashlib.sha256(json.dumps([norm.to_dict(), precision_name(dtype), list(x.shape)]).encode())
    for name, t in model.state_dict().items():
        if not finetune.is_head(name, head):
            h.update(name.encode())
            h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    h.update(x.contiguous().reshape(-1).numpy())
    return h.hexdigest()[:32]


def embeddings(model: nn.Module, x: torch.Tensor, norm: Normalization, device: torch.device, dtype: torch.dtype,
               batch_size: int, world: World, log) -> torch.Tensor:
    """The body's outputs for images `x` (float32, on the CPU): from the cache, or computed (each rank its
    share) and cached by rank 0."""
    path = sources.cache_dir() / "features" / f"{feature_key(model, norm, dtype, x)}.safetensors"
    if dist.broadcast(world, path.is_file() if world.main else None):
        from safetensors.torch import load_file

        return load_file(str(path))["embeddings"]
    part = evaluate.predict_logits(Embedder(model), dist.shard(world, x), norm, device, dtype, batch_size)
    whole = dist.gather_shards(world, part)
    if world.main:
        _write(path, whole, log)
    return whole


def _write(path: Path, whole: torch.Tensor, log) -> None:
    """Cache the embeddings; a cache that cannot be written only costs the next probe the embedding pass."""
    from safetensors.torch import save_file

    try:
        with files.atomic_path(path) as tmp:
            save_file({"embeddings": whole.contiguous()}, str(tmp))
    except Exception as e:  # noqa: BLE001  (a read-only or full cache folder)
        log(f"warning: the embeddings were not cached ({e})")


def _train_head(head: nn.Module, feats: dict, ds: Dataset, cfg: TrainConfig, device: torch.device,
                run_dir: Path | None, log, trackers) -> tuple[list[dict], dict]:
    """Mini-batch training of the head alone, each epoch shuffled by its own (seed, epoch) generator."""
    x, y = feats["train"].to(device), ds.y_train.to(device)
    x_val, y_val = feats["validation"].to(device), ds.validation[1].to(device)
    steps = -(-len(y) // cfg.batch_size)
    opt = make_optimizer(cfg, head)
    schedule = make_schedule(cfg, opt, steps * cfg.epochs)
    weight = data.class_weights(ds.y_train, ds.num_classes).to(device) if cfg.class_weights == "auto" else None
    history: list[dict] = []
    best: dict = {}
    for epoch in range(cfg.epochs):
        t0, loss_sum, correct = time.perf_counter(), 0.0, 0
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        head.train()
        for step in range(steps):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)
            logits = head(x[idx])
            loss = F.cross_entropy(logits, y[idx], weight=weight, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip_grad)
            opt.step()
            schedule.step()
            loss_sum, correct = loss_sum + loss.item() * len(idx), correct + (logits.argmax(1) == y[idx]).sum().item()
        record = _epoch_record(head, epoch, x_val, y_val, loss_sum / len(y), correct / len(y),
                               time.perf_counter() - t0, len(y))
        history.append(record)
        if hasattr(schedule, "epoch_end"):
            schedule.epoch_end(record[cfg.monitor])
        if improves(record[cfg.monitor], best.get("value"), lower_is_better=cfg.monitor == "val_loss"):
            best = {"epoch": epoch + 1, "value": record[cfg.monitor],
                    "weights": {k: v.clone() for k, v in head.state_dict().items()}}
        _say(record, cfg, run_dir, history, log, trackers, opt)
    return history, best


def _epoch_record(head: nn.Module, epoch: int, x_val: torch.Tensor, y_val: torch.Tensor, train_loss: float,
                  train_acc: float, seconds: float, seen: int) -> dict:
    head.eval()
    with torch.no_grad():
        logits = head(x_val).float()
    val_loss = F.cross_entropy(logits, y_val).item() if len(y_val) else 0.0
    val_acc = (logits.argmax(1) == y_val).float().mean().item() if len(y_val) else 0.0
    return {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
            "val_acc": val_acc, "seconds": round(seconds, 3), "images_per_s": round(seen / max(seconds, 1e-9), 1),
            "val_seconds": 0.0}


def _say(record: dict, cfg: TrainConfig, run_dir: Path | None, history: list[dict], log, trackers, opt) -> None:
    if run_dir is not None:
        runs.write_history(run_dir, history)
    if trackers is not None:
        trackers.epoch(record, opt.param_groups[0]["lr"])
    log(f"Epoch {record['epoch']}/{cfg.epochs} - {record['seconds']:.2f}s - loss {record['train_loss']:.4f} - "
        f"acc {record['train_acc']:.4f} - val_loss {record['val_loss']:.4f} - val_acc {record['val_acc']:.4f}")
