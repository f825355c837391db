"""The training loop: flat and visible, one epoch after another, a checkpoint after each.

    run = train(presets.get("seed"), DataConfig(path="cifar10-jpeg"))   # returns the run directory
    resume(run)                                                           # after an interruption

A seeded CPU run is bit-for-bit repeatable: every epoch draws its shuffle and augmentations from its
own generator seeded by (seed, epoch), and a checkpoint stores that generator's state mid-epoch, so a
resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import __version__, augment, data, dist, evaluate, files, models, report, runs
from .analysis import Interpretation
from .config import DataConfig, TrainConfig, from_dict
from .data import Dataset, Normalization
from .device import autocast, keep_freed_memory, pick_device, pick_precision, precision_name
from .dist import World
from .errors import CnnlabError, Interrupted
from .optim import Lookahead, make_optimizer, make_schedule

STOP = threading.Event()  # set by Ctrl-C; the loop checks it between steps so no update is cut in half


def say(*args) -> None:
    """Print and flush at once, so progress shows up in logs and pipes as it happens."""
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------------
# Training


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def _train_step(model, opt, sched, scaler, xb, yb, cfg: TrainConfig, device, dtype, world: World = World()):
    """One SGD step; (None, None) without an update when the loss is not finite (on any rank)."""
    with autocast(device, dtype):
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
    if dist.any_rank(world, not torch.isfinite(loss), device):  # before the update: the weights never see it
        sched.step()  # the schedule stays aligned with the step count when the batch is skipped
        return None, None
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.detach(), (logits.argmax(1) == yb).sum()


@contextlib.contextmanager
def _ctrl_c_requests_stop():
    """While training, the first Ctrl-C asks the loop to stop and checkpoint; a second one aborts."""
    STOP.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _fit(run_dir: Path, cfg: TrainConfig, ds: Dataset, state: dict | None, log, world: World = World()) -> None:
    device = dist.device_for(world, pick_device(cfg.device))
    dtype = pick_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(cfg.seed)  # the same seed on every rank: identical initial weights
    model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size).to(device)
    model = model.to(memory_format=torch.channels_last)  # oneDNN and cuDNN convolutions run faster in NHWC
    norm = Normalization.fit(ds.x_train) if cfg.normalize == "meanstd" else Normalization()
    if cfg.normalize not in ("unit", "meanstd"):
        raise CnnlabError(f"unknown normalization {cfg.normalize!r}; use unit or meanstd")
    if cfg.on_nan not in ("stop", "skip-batch"):
        raise CnnlabError(f"unknown --on-nan {cfg.on_nan!r}; use stop or skip-batch")
    # checkpoint and its predecessor (weights + optimizer state + lookahead copy), final weights, reports
    per_copy = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if world.main:
        files.require_space(run_dir, per_copy * 2 * (2 + (cfg.optimizer == "adam") + cfg.lookahead) + per_copy
                            + 2**25, "this run's checkpoints")
    rank_batch = dist.per_rank_batch(world, cfg.batch_size)
    aug = augment.get(cfg.augment)
    n = len(ds.y_train)
    steps_per_epoch = -(-n // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if state is None and hasattr(model, "init_from_data"):  # e.g. airbench's whitening layer
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:5000]
        model.init_from_data(norm(ds.x_train[sample]).to(device))
    if state is None and cfg.init_from:
        log(runs.init_from(model, cfg.model, cfg.init_from))
    model = _sync_bn(model, cfg, world, device)
    opt = make_optimizer(cfg, model)
    sched = make_schedule(cfg, opt, total_steps)
    lookahead = Lookahead(model, total_steps) if cfg.lookahead else None
    forward = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world.distributed else model
    forward = torch.compile(forward) if cfg.compile else forward
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    history: list[dict] = []
    start_epoch, start_step = 0, 0
    running = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if lookahead is not None:
            lookahead.load_state_dict(state["lookahead"])
        norm = Normalization.from_dict(state["normalization"])
        torch.set_rng_state(state["torch_rng"])
        history, running = state["history"], state["running"]  # all ranks' totals, kept by rank 0 alone
        running = running if world.main else {**running, "loss": 0.0, "correct": 0, "seen": 0}
        start_epoch, start_step = state["epoch"], state["step"]
    x_train = ds.x_train.to(device)
    y_train = ds.y_train.to(device)

    def checkpoint(epoch: int, step: int, g: torch.Generator | None) -> None:
        """The global state (every rank calls this; rank 0 writes it), so any world size can resume it."""
        totals = dist.all_sum(world, [running["loss"], running["correct"], running["seen"]], device)
        if not world.main:
            return
        runs.save_checkpoint(run_dir, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "lookahead": lookahead.state_dict() if lookahead else None,
            "epoch": epoch, "step": step,
            "epoch_rng": g.get_state() if g is not None else None, "torch_rng": torch.get_rng_state(),
            "running": {**running, "loss": totals[0], "correct": int(totals[1]), "seen": int(totals[2])},
            "history": history, "normalization": norm.to_dict()})

    log(f"training {cfg.model} ({models.count_params(model):,} parameters) on {n:,} images, "
        f"{cfg.epochs} epochs of {steps_per_epoch} steps; device {device}, {precision_name(dtype)}"
        + (f"; {world.size} processes of {rank_batch} images a step" if world.distributed else ""))
    with _ctrl_c_requests_stop():
        for epoch in range(start_epoch, cfg.epochs):
            g = _epoch_generator(cfg.seed, epoch)
            perm = torch.randperm(n, generator=g).to(device)
            first = start_step if epoch == start_epoch else 0
            if first:
                g.set_state(state["epoch_rng"])
            else:
                running = {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            model.train()
            if cfg.whiten_bias_epochs is not None and hasattr(model, "whiten"):
                model.whiten.bias.requires_grad_(epoch < cfg.whiten_bias_epochs)
            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"Epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", leave=False, dynamic_ncols=True, disable=None if world.main else True)
            t0 = time.perf_counter() - running["seconds"]
            for step in range(first, steps_per_epoch):
                idx = dist.shard(world, perm[step * cfg.batch_size:(step + 1) * cfg.batch_size])
                if len(idx) == 0:  # a last batch smaller than the world: the same on every rank, so all skip it
                    sched.step()
                    continue
                xb = aug(norm(x_train[idx]), g, epoch=epoch, idx=idx).contiguous(memory_format=torch.channels_last)
                yb = y_train[idx]
                loss, correct = _train_step(forward, opt, sched, scaler, xb, yb, cfg, device, dtype, world)
                if loss is None:
                    where = f"epoch {epoch + 1}, step {step + 1}"
                    if cfg.on_nan == "stop":
                        bar.close()
                        raise CnnlabError(
                            f"the loss became non-finite at {where}; training stopped and the last good checkpoint "
                            f"in {run_dir} is kept. Try a lower learning rate (e.g. --lr {cfg.lr / 10:g}), or "
                            "--on-nan skip-batch")
                    running["skipped"] = running.get("skipped", 0) + 1
                    tqdm.write(f"warning: non-finite loss at {where}: batch skipped")
                    bar.update()
                    continue
                if lookahead is not None:
                    lookahead.step(model, epoch * steps_per_epoch + step + 1)
                running["loss"] += loss.item() * len(idx)
                running["correct"] += int(correct)
                running["seen"] += len(idx)
                running["seconds"] = time.perf_counter() - t0
                bar.update()
                if step % 10 == 0 or step == steps_per_epoch - 1:
                    bar.set_postfix(loss=f"{running['loss'] / running['seen']:.4f}",
                                    acc=f"{running['correct'] / running['seen']:.4f}",
                                    img_s=f"{running['seen'] / running['seconds']:,.0f}", refresh=False)
                stop = dist.any_rank(world, STOP.is_set(), device)  # torchrun signals each rank at its own moment
                if stop and step < steps_per_epoch - 1:  # after the last step, finish the epoch
                    bar.close()
                    checkpoint(epoch, step + 1, g)
                    raise Interrupted(run_dir)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step < steps_per_epoch - 1:
                    checkpoint(epoch, step + 1, g)
            bar.close()
            seconds = running["seconds"]
            # test-time augmentation multiplies evaluation cost; spend it only on the final weights
            tta = cfg.tta if epoch == cfg.epochs - 1 else 0
            val = _validate(model, ds, norm, device, dtype, cfg, tta, world)
            loss_sum, correct_sum, seen = dist.all_sum(world, [running["loss"], running["correct"], running["seen"]],
                                                       device)
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                      "train_acc": correct_sum / max(seen, 1), "val_loss": val[0], "val_acc": val[1],
                      "seconds": round(seconds, 3), "images_per_s": round(seen / max(seconds, 1e-9), 1)}
            history.append(record)
            if world.main:
                runs.write_history(run_dir, history)
            checkpoint(epoch + 1, 0, None)
            log(f"Epoch {epoch + 1}/{cfg.epochs} - {seconds:.1f}s - {record['images_per_s']:,.0f} img/s - "
                f"loss {record['train_loss']:.4f} - acc {record['train_acc']:.4f} - "
                f"val_loss {val[0]:.4f} - val_acc {val[1]:.4f}")
            if running.get("skipped"):
                log(f"warning: {running['skipped']} batches of epoch {epoch + 1} were skipped (non-finite loss)")
            if dist.any_rank(world, STOP.is_set(), device):
                raise Interrupted(run_dir)
    if not world.main:
        return
    meta = {"model": cfg.model, "classes": ds.classes, "in_channels": ds.channels,
            "image_size": list(ds.image_size), "normalization": norm.to_dict(),
            "params": models.count_params(model), "precision": precision_name(dtype), "tta": cfg.tta,
            "epochs": cfg.epochs, "train_seconds": round(sum(h["seconds"] for h in history), 3)}
    runs.save_model(run_dir, model, meta)


def _sync_bn(model: nn.Module, cfg: TrainConfig, world: World, device: torch.device) -> nn.Module:
    """--sync-bn: BatchNorm statistics over the global batch rather than each rank's share."""
    if not (cfg.sync_bn and world.distributed):
        return model
    if device.type != "cuda":
        raise CnnlabError("--sync-bn needs CUDA devices: PyTorch's DistributedDataParallel refuses "
                          "SyncBatchNorm in CPU processes")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _validate(model, ds: Dataset, norm, device, dtype, cfg: TrainConfig, tta: int, world: World) -> tuple[float, float]:
    """Loss and accuracy on the validation set, each rank taking its share (summed, not repeated)."""
    x, y = ds.validation
    x, y = dist.shard(world, x), dist.shard(world, y)
    loss, acc = (evaluate.loss_and_accuracy(model, x, y, norm, device, dtype, cfg.eval_batch_size, tta=tta)
                 if len(y) else (0.0, 0.0))
    loss_sum, correct, count = dist.all_sum(world, [loss * len(y), acc * len(y), len(y)], device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _load_data(data_cfg: DataConfig, seed: int, log=say) -> Dataset:
    ds = data.load_dataset(data_cfg.path, val_fraction=data_cfg.val_fraction, split_seed=data_cfg.split_seed,
                           image_size=data_cfg.image_size, label_mode=data_cfg.label_mode,
                           class_names=data_cfg.class_names, skip_bad_images=data_cfg.skip_bad_images)
    if ds.skipped:
        log(f"warning: skipped {len(ds.skipped)} unreadable image file(s) (recorded in config.json): "
            + "; ".join(ds.skipped[:3]) + ("; ..." if len(ds.skipped) > 3 else ""))
    if data_cfg.val_split:  # before the subset, so that the held-out images never depend on the training seed
        ds = ds.hold_out(data_cfg.val_split, data_cfg.split_seed)
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


def _finish(run_dir: Path, ds: Dataset, cfg: TrainConfig, log, with_report: bool) -> Path:
    """Evaluate the final weights, write metrics, confusion matrix and report, say where they are."""
    interp = Interpretation.from_run(run_dir, dataset=ds, device=cfg.device)
    result = evaluate.save_metrics(run_dir, interp.logits, interp.y_true, interp.classes, ds.source)
    log(evaluate.format_metrics(result))
    outputs = ["model.safetensors", "metrics.json", "confusion_matrix.png", "history.csv"]
    if with_report:
        report.write_report(run_dir, interp)
        outputs.append("report.html")
    log(f"\nrun directory: {run_dir}")
    for name in outputs:
        log(f"  {name:<22}{run_dir / name}")
    return run_dir


def train(cfg: TrainConfig, data_cfg: DataConfig | None = None, *, preset: str = "custom",
          out: str | Path | None = None, runs_root: str | Path = "runs", dataset: Dataset | None = None,
          with_report: bool = True, log=say) -> Path:
    """Train, evaluate and return the run directory. `dataset` skips loading (already in memory).

    Under torchrun every process calls this; rank 0 alone writes the run directory and prints.
    """
    world = dist.init()
    log = log if world.main else _quiet
    data_cfg = data_cfg or DataConfig()
    models.check(cfg.model)  # a typo in a name or spec should not cost a data load first
    if cfg.init_from:
        runs.read_json(Path(cfg.init_from) / "model.json", "--init-from needs a finished training run")
    ds = dataset or _load_once(world, lambda: _load_data(data_cfg, cfg.seed, log))
    run_dir = _new_run_dir(out, runs_root, preset) if world.main else None
    run_dir = Path(dist.broadcast(world, str(run_dir) if run_dir else None))
    if world.main:
        _write_config(run_dir, cfg, data_cfg, ds, preset, world)
        log(f"run directory: {run_dir}")
    _fit(run_dir, cfg, ds, None, log, world)
    return _finish(run_dir, ds, cfg, log, with_report) if world.main else run_dir


def _new_run_dir(out: str | Path | None, runs_root: str | Path, preset: str) -> Path:
    try:
        if out is not None:
            run_dir = Path(out)
            if (run_dir / "config.json").exists():
                raise CnnlabError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = runs.new_run_dir(runs_root, preset)
    except OSError as e:
        raise CnnlabError(f"cannot create the run directory {out or runs_root}: {e.strerror or e}") from None
    return run_dir


def _write_config(run_dir: Path, cfg: TrainConfig, data_cfg: DataConfig, ds: Dataset, preset: str,
                  world: World) -> None:
    device = pick_device(cfg.device)
    config = {"preset": preset, "train": asdict(cfg),
              "data": {**asdict(data_cfg), "path": ds.source, "format": ds.format, "split": ds.split,
                       "classes": ds.classes, "train_images": len(ds.y_train), "test_images": len(ds.y_test),
                       "skipped_images": list(ds.skipped),
                       "validation": (f"stratified {data_cfg.val_split:.0%} of the training images "
                                      f"(seed {data_cfg.split_seed}), {len(ds.y_val)} images"
                                      if ds.y_val is not None else "the test set (as the tutorial does)")},
              "environment": {"cnnlab": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "device": str(device), "processes": world.size,
                              "precision": precision_name(pick_precision(cfg.precision, device))}}
    files.write_json(run_dir / "config.json", config)


def resume(run_dir: str | Path, data_path: str | None = None, *, with_report: bool = True, log=say) -> Path:
    """Continue an interrupted run from its last checkpoint; the result equals an uninterrupted run.

    The checkpoint holds the global state, so a run may resume under another number of processes.
    """
    world = dist.init()
    log = log if world.main else _quiet
    run_dir = Path(run_dir)
    config, state, finished = None, None, False
    if world.main:  # only rank 0's machine need hold the run directory
        config = runs.read_json(run_dir / "config.json", "is it a run directory?")
        for leftover in run_dir.glob(".*.tmp"):  # a write that a kill cut short; never a file anything reads
            leftover.unlink(missing_ok=True)
        state = runs.load_checkpoint(run_dir, log)
        finished = (run_dir / "model.safetensors").exists()
    config, state, finished = dist.broadcast(world, (config, state, finished))
    cfg = from_dict(TrainConfig, config["train"])
    data_cfg = from_dict(DataConfig, {**config["data"], **({"path": data_path} if data_path else {})})
    ds = _load_once(world, lambda: _load_data(data_cfg, cfg.seed, log))
    if ds.classes != config["data"]["classes"]:
        raise CnnlabError(f"the data at {ds.source} has other classes than the run was trained on")
    if state is not None and state["epoch"] >= cfg.epochs and finished:
        if not world.main or (run_dir / "metrics.json").exists():
            log(f"{run_dir} already finished all {cfg.epochs} epochs")
            return run_dir
        log(f"{run_dir} finished training but not its evaluation: evaluating now")  # stopped in between
        return _finish(run_dir, ds, cfg, log, with_report)
    if state is None:
        log(f"{run_dir} has no checkpoint yet (it stopped before the first one): starting from the beginning")
    else:
        log(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    _fit(run_dir, cfg, ds, state, log, world)
    return _finish(run_dir, ds, cfg, log, with_report) if world.main else run_dir
