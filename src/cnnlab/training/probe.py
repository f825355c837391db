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
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import dist, files, models
from cnnlab.config import TrainConfig
from cnnlab.data import sources
from cnnlab.data.dataset import Dataset, Normalization
from cnnlab.data.loader import Batches
from cnnlab.device import autocast, precision_name
from cnnlab.dist import World
from cnnlab.evaluation import evaluate
from cnnlab.run import Run
from cnnlab.training import finetune
from cnnlab.training.build import class_weight, train_state
from cnnlab.training.hooks import History, Monitor, Trackers
from cnnlab.training.keep import calibrate, cpu_weights, keep_rule, model_meta
from cnnlab.training.loop import Fit, Hook, fit
from cnnlab.training.preflight import Plan
from cnnlab.training.step import Step

log = logging.getLogger(__name__)

IGNORED = ("augment", "ema", "lookahead", "accumulate", "tta")  # settings that act on images or on many steps


class Embedder(nn.Module):
    """The body of a network as a module of its own: images in, the head's input out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def fit_head(plan: Plan, ds: Dataset, run: Run, trackers=None) -> dict:
    """Train the head on cached embeddings through the training loop; save the whole network (process 0).
    Returns what the end of the run needs, as lifecycle.train_run does: the test-set logits when the validation
    set is the test set (else None), the history, model.json."""
    cfg, device, world = _probe_settings(plan.cfg), plan.device, plan.world
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size).to(device)
    finetune.start_from(model, cfg)
    norm = finetune.normalization(cfg, ds, None, say=False)
    head = model.get_submodule(finetune.head_name(model))
    splits = {"train": ds.x_train, "validation": ds.validation[0]}
    if ds.y_val is not None:
        splits["test"] = ds.x_test
    t0 = time.perf_counter()
    feats = {name: embeddings(model, x, norm, device, plan.dtype, cfg.eval_batch_size, world)
             for name, x in splits.items()}
    log.info(f"embedded {sum(len(x) for x in splits.values()):,} images with the frozen {cfg.model} in "
             f"{time.perf_counter() - t0:.1f} s; training its head ({models.count_params(head):,} parameters) "
             f"for {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}")
    history, best = _train_head(head, feats, ds, cfg, device, run if world.main else None, trackers)
    kept = history[-1]["epoch"]
    if keep_rule(cfg, ds.y_val is not None) == "best" and best["epoch"] != kept:
        head.load_state_dict(best["weights"])
        kept = best["epoch"]
    log.info(f"best epoch: {best['epoch']} ({cfg.monitor} {best['value']:.4f}); model.safetensors holds epoch "
             f"{kept}'s head")
    meta, logits = None, None
    if world.main:
        with torch.no_grad(), autocast(device, plan.dtype):  # as the whole network computes its head: evaluate agrees
            held = head(feats["validation"].to(device)).float().cpu()
        calibrated = calibrate(plan, ds, model, norm, held)[0]
        meta = {**model_meta(cfg, ds, norm, model, plan.dtype, history), "epoch": kept, "best_epoch": best["epoch"],
                "head_only": True, "calibration": calibrated}
        run.save_model(cpu_weights(model), meta)
        logits = held if ds.y_val is None else None
    return {"test_logits": logits, "history": history, "meta": meta}


def _probe_settings(cfg: TrainConfig) -> TrainConfig:
    """What a probe honours: settings that act on images (augmentation, test-time views) or average weights
    over many steps do not apply to cached embeddings, and are said to be left out."""
    defaults = TrainConfig()
    left_out = [name for name in IGNORED if getattr(cfg, name) != getattr(defaults, name)]
    if left_out:
        log.info(f"--head-only: {', '.join(n.replace('_', '-') for n in left_out)} "
                 f"do{'es' * (len(left_out) == 1)} not apply to cached embeddings; left out")
    # the head trains whole from its first epoch: nothing of the body is frozen or unfrozen on the way
    return replace(cfg, **{name: getattr(defaults, name) for name in IGNORED}, lr_spread=1.0, freeze_epochs=0,
                   whiten_bias_epochs=None)


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
               batch_size: int, world: World) -> torch.Tensor:
    """The body's outputs for images `x` (float32, on the CPU): from rank 0's cache (sent to the others: their
    machines need not share its disk), or computed (each rank its share) and cached by rank 0."""
    path = sources.cache_dir() / "features" / f"{feature_key(model, norm, dtype, x)}.safetensors"
    if dist.broadcast(world, path.is_file() if world.main else None):
        from safetensors.torch import load_file

        return dist.broadcast(world, load_file(str(path))["embeddings"] if world.main else None)
    part = evaluate.predict_logits(Embedder(model), dist.shard(world, x), norm, device, dtype, batch_size)
    whole = dist.gather_shards(world, part)
    if world.main:
        _write(path, whole)
    return whole


def _write(path: Path, whole: torch.Tensor) -> None:
    """Cache the embeddings; a cache that cannot be written only costs the next probe the embedding pass."""
    from safetensors.torch import save_file

    try:
        with files.atomic_path(path) as tmp:
            save_file({"embeddings": whole.contiguous()}, str(tmp))
    except Exception as e:  # noqa: BLE001  (a read-only or full cache folder)
        log.info(f"warning: the embeddings were not cached ({e})")


def _train_head(head: nn.Module, feats: dict, ds: Dataset, cfg: TrainConfig, device: torch.device,
                run: Run | None, trackers) -> tuple[list[dict], dict]:
    """The head alone trained by the training loop on the embeddings (in fp32, as the head of the whole network
    was trained), each epoch shuffled by its own (seed, epoch) generator; validated on the embeddings."""
    batches = Batches(feats["train"], ds.y_train, batch_size=cfg.batch_size, seed=cfg.seed, norm=None,
                      num_classes=ds.num_classes, device=device)
    ts = train_state(cfg, head, Normalization(), device, torch.float32, batches.steps * cfg.epochs)
    step = Step(cfg, device, torch.float32, batches.steps, class_weight=class_weight(cfg, ds, device))
    best = BestHead(feats["validation"].to(device), ds.validation[1].to(device))
    hooks = [best, *([History(run)] if run is not None else []), *([Trackers(trackers)] if trackers else []),
             Monitor(cfg, None), HeadLog()]  # no checkpoints: a resumed probe runs again from its cached embeddings
    fit(ts, batches, step, hooks, epochs=cfg.epochs)
    return ts.history, {**ts.best, "weights": best.weights}


class BestHead(Hook):
    """The head's validation (all embeddings at once) and its best epoch's weights, kept in memory. It takes
    Validate's place (order 20): the history, the trackers and Monitor come after it."""
    order = 20

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor):
        self.x_val, self.y_val, self.weights = x_val, y_val, None

    def end_epoch(self, fit: Fit) -> None:
        s, t = fit.state, fit.totals
        s.model.eval()
        with torch.no_grad():
            logits = s.model(self.x_val).float()
        y = self.y_val
        fit.record = {"epoch": s.epoch + 1, "train_loss": t["loss"] / max(t["seen"], 1),
                      "train_acc": t["correct"] / max(t["seen"], 1),
                      "val_loss": F.cross_entropy(logits, y).item() if len(y) else 0.0,
                      "val_acc": (logits.argmax(1) == y).float().mean().item() if len(y) else 0.0,
                      "seconds": round(s.seconds, 3), "images_per_s": round(t["seen"] / max(s.seconds, 1e-9), 1),
                      "val_seconds": 0.0}
        s.history.append(fit.record)

    def after_epoch(self, fit: Fit) -> None:
        if fit.state.best.get("epoch") == fit.record["epoch"]:  # Monitor found this epoch the best
            self.weights = {k: v.clone() for k, v in fit.state.model.state_dict().items()}


class HeadLog(Hook):
    order = 80  # EpochLog's place

    def after_epoch(self, fit: Fit) -> None:
        r = fit.record
        log.info(f"Epoch {r['epoch']}/{fit.epochs} - {r['seconds']:.2f}s - loss {r['train_loss']:.4f} - "
                 f"acc {r['train_acc']:.4f} - val_loss {r['val_loss']:.4f} - val_acc {r['val_acc']:.4f}")
