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
from tqdm import tqdm

from . import __version__, augment, data, evaluate, files, models, report, runs
from .analysis import Interpretation
from .config import DataConfig, TrainConfig, from_dict
from .data import Dataset, Normalization
from .device import autocast, pick_device, pick_precision, precision_name
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


def _train_step(model, opt, sched, scaler, xb, yb, cfg: TrainConfig, device, dtype):
    with autocast(device, dtype):
        logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
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


def _fit(run_dir: Path, cfg: TrainConfig, ds: Dataset, state: dict | None, log) -> None:
    device = pick_device(cfg.device)
    dtype = pick_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.channels, ds.num_classes, ds.image_size).to(device)
    model = model.to(memory_format=torch.channels_last)  # oneDNN and cuDNN convolutions run faster in NHWC
    norm = Normalization.fit(ds.x_train) if cfg.normalize == "meanstd" else Normalization()
    if cfg.normalize not in ("unit", "meanstd"):
        raise CnnlabError(f"unknown normalization {cfg.normalize!r}; use unit or meanstd")
    aug = augment.get(cfg.augment)
    n = len(ds.y_train)
    steps_per_epoch = -(-n // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if state is None and hasattr(model, "init_from_data"):  # e.g. airbench's whitening layer
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:5000]
        model.init_from_data(norm(ds.x_train[sample]).to(device))
    if state is None and cfg.init_from:
        log(runs.init_from(model, cfg.model, cfg.init_from))
    opt = make_optimizer(cfg, model)
    sched = make_schedule(cfg, opt, total_steps)
    lookahead = Lookahead(model, total_steps) if cfg.lookahead else None
    forward = torch.compile(model) if cfg.compile else model
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
        history, running = state["history"], state["running"]
        start_epoch, start_step = state["epoch"], state["step"]
    x_train = ds.x_train.to(device)
    y_train = ds.y_train.to(device)

    def checkpoint(epoch: int, step: int, g: torch.Generator | None) -> None:
        runs.save_checkpoint(run_dir, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "lookahead": lookahead.state_dict() if lookahead else None,
            "epoch": epoch, "step": step,
            "epoch_rng": g.get_state() if g is not None else None, "torch_rng": torch.get_rng_state(),
            "running": running, "history": history, "normalization": norm.to_dict()})

    log(f"training {cfg.model} ({models.count_params(model):,} parameters) on {n:,} images, "
        f"{cfg.epochs} epochs of {steps_per_epoch} steps; device {device}, {precision_name(dtype)}")
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
                       unit="step", leave=False, dynamic_ncols=True, disable=None)
            t0 = time.perf_counter() - running["seconds"]
            for step in range(first, steps_per_epoch):
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                xb = aug(norm(x_train[idx]), g, epoch=epoch, idx=idx).contiguous(memory_format=torch.channels_last)
                yb = y_train[idx]
                loss, correct = _train_step(forward, opt, sched, scaler, xb, yb, cfg, device, dtype)
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
                if STOP.is_set() and step < steps_per_epoch - 1:  # after the last step, finish the epoch
                    bar.close()
                    checkpoint(epoch, step + 1, g)
                    raise Interrupted(run_dir)
            bar.close()
            seconds = running["seconds"]
            # test-time augmentation multiplies evaluation cost; spend it only on the final weights
            tta = cfg.tta if epoch == cfg.epochs - 1 else 0
            val = evaluate.loss_and_accuracy(model, *ds.validation, norm, device, dtype, cfg.eval_batch_size, tta=tta)
            record = {"epoch": epoch + 1, "train_loss": running["loss"] / running["seen"],
                      "train_acc": running["correct"] / running["seen"], "val_loss": val[0], "val_acc": val[1],
                      "seconds": round(seconds, 3), "images_per_s": round(running["seen"] / seconds, 1)}
            history.append(record)
            runs.write_history(run_dir, history)
            checkpoint(epoch + 1, 0, None)
            log(f"Epoch {epoch + 1}/{cfg.epochs} - {seconds:.1f}s - {record['images_per_s']:,.0f} img/s - "
                f"loss {record['train_loss']:.4f} - acc {record['train_acc']:.4f} - "
                f"val_loss {val[0]:.4f} - val_acc {val[1]:.4f}")
            if STOP.is_set():
                raise Interrupted(run_dir)
    meta = {"model": cfg.model, "classes": ds.classes, "in_channels": ds.channels,
            "image_size": list(ds.image_size), "normalization": norm.to_dict(),
            "params": models.count_params(model), "precision": precision_name(dtype), "tta": cfg.tta,
            "epochs": cfg.epochs, "train_seconds": round(sum(h["seconds"] for h in history), 3)}
    runs.save_model(run_dir, model, meta)


def _load_data(data_cfg: DataConfig, seed: int) -> Dataset:
    ds = data.load_dataset(data_cfg.path, val_fraction=data_cfg.val_fraction, split_seed=data_cfg.split_seed,
                           image_size=data_cfg.image_size, label_mode=data_cfg.label_mode,
                           class_names=data_cfg.class_names)
    if data_cfg.val_split:  # before the subset, so that the held-out images never depend on the training seed
        ds = ds.hold_out(data_cfg.val_split, data_cfg.split_seed)
    return ds.subset(data_cfg.subset, seed) if data_cfg.subset else ds


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
    """Train, evaluate and return the run directory. `dataset` skips loading (already in memory)."""
    data_cfg = data_cfg or DataConfig()
    models.check(cfg.model)  # a typo in a name or spec should not cost a data load first
    if cfg.init_from:
        runs.read_json(Path(cfg.init_from) / "model.json", "--init-from needs a finished training run")
    ds = dataset or _load_data(data_cfg, cfg.seed)
    if out is not None:
        run_dir = Path(out)
        if (run_dir / "config.json").exists():
            raise CnnlabError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = runs.new_run_dir(runs_root, preset)
    device = pick_device(cfg.device)
    config = {"preset": preset, "train": asdict(cfg),
              "data": {**asdict(data_cfg), "path": ds.source, "format": ds.format, "split": ds.split,
                       "classes": ds.classes, "train_images": len(ds.y_train), "test_images": len(ds.y_test),
                       "validation": (f"stratified {data_cfg.val_split:.0%} of the training images "
                                      f"(seed {data_cfg.split_seed}), {len(ds.y_val)} images"
                                      if ds.y_val is not None else "the test set (as the tutorial does)")},
              "environment": {"cnnlab": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "device": str(device),
                              "precision": precision_name(pick_precision(cfg.precision, device))}}
    files.write_json(run_dir / "config.json", config)
    log(f"run directory: {run_dir}")
    _fit(run_dir, cfg, ds, None, log)
    return _finish(run_dir, ds, cfg, log, with_report)


def resume(run_dir: str | Path, data_path: str | None = None, *, with_report: bool = True, log=say) -> Path:
    """Continue an interrupted run from its last checkpoint; the result equals an uninterrupted run."""
    run_dir = Path(run_dir)
    config = runs.read_json(run_dir / "config.json", "is it a run directory?")
    cfg = from_dict(TrainConfig, config["train"])
    data_cfg = from_dict(DataConfig, {**config["data"], **({"path": data_path} if data_path else {})})
    state = runs.load_checkpoint(run_dir)
    ds = _load_data(data_cfg, cfg.seed)
    if ds.classes != config["data"]["classes"]:
        raise CnnlabError(f"the data at {ds.source} has other classes than the run was trained on")
    if state["epoch"] >= cfg.epochs and (run_dir / "model.safetensors").exists():
        log(f"{run_dir} already finished all {cfg.epochs} epochs")
        return run_dir
    log(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    _fit(run_dir, cfg, ds, state, log)
    return _finish(run_dir, ds, cfg, log, with_report)
