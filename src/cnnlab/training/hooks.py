"""What extends the training loop (loop.py): each a `Hook`, in the order `default_hooks` lists them.

    Progress      the progress bar, from the totals read at each sync
    NonFinite     --on-nan stop: a non-finite step stops the run, on every process at the same step
    Validate      BatchNorm statistics where they lag, validation, the epoch's record into the history
    History       history.csv/.json after each epoch (process 0)
    Checkpoints   checkpoints: after each epoch, every N steps, and when stopped
    Trackers      TensorBoard / MLflow: running means at each sync, the record at each epoch's end
    Monitor       the monitored value: best weights, early stopping, the plateau schedule's rate
    Governor      the busy-machine thread governor (threads.py), at each sync
    EpochLog      the epoch's line, and warnings (skipped steps, validation at chance)
    CtrlC         the first Ctrl-C (or SIGTERM) asks the loop to stop and checkpoint; a second one aborts

A hook of your own (a test's fault, a callback) is any `Hook` subclass added to the list `train(hooks=...)`
takes; it runs after these. One such is here, not a default: `NoHostSync`, the GPU check that no step waits for
the host.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cnnlab import dist
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import Dataset
from cnnlab.errors import EveryProcessError
from cnnlab.evaluation import evaluate
from cnnlab.run import Run
from cnnlab.training import batchnorm, finetune
from cnnlab.training.keep import cpu_weights
from cnnlab.training.loop import STOP, Fit, Hook
from cnnlab.training.optim import improves
from cnnlab.training.threads import ThreadGovernor

log = logging.getLogger(__name__)


class Progress(Hook):
    order = 0

    def __init__(self, main: bool):
        self.disable = None if main else True  # tqdm's None: on where the output is a terminal
        self.bar, self.shown = None, 0

    def before_epoch(self, fit: Fit) -> None:
        s = fit.state
        self.bar = tqdm(total=fit.batches.steps, initial=s.step, desc=f"Epoch {s.epoch + 1}/{fit.epochs}", unit="step",
                        leave=False, dynamic_ncols=True, disable=self.disable)
        self.shown = s.step

    def after_sync(self, fit: Fit, totals: dict) -> None:
        if self.bar is None or fit.state.step == self.shown:
            return
        seen = max(totals["seen"], 1)
        self.bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}", acc=f"{totals['correct'] / seen:.4f}",
                             img_s=f"{totals['seen'] / max(fit.state.seconds, 1e-9):,.0f}", refresh=False)
        self.bar.update(fit.state.step - self.shown)
        self.shown = fit.state.step

    def close(self, fit: Fit) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    before_stop = end_epoch = after_fit = close


class NonFinite(Hook):
    order = 10

    def __init__(self, cfg: TrainConfig, run: Run):
        self.cfg, self.run = cfg, run

    def after_sync(self, fit: Fit, totals: dict) -> None:
        if totals["skipped"] and self.cfg.on_nan == "stop":
            where = f"epoch {fit.state.epoch + 1}, step {totals['first_bad_step'] + 1}"
            raise EveryProcessError(f"the loss became non-finite at {where}; training stopped and the last good "
                                    f"checkpoint in {self.run} is kept. Try a lower learning rate (e.g. --lr "
                                    f"{self.cfg.lr / 10:g}), or --on-nan skip-batch")


class Validate(Hook):
    """Loss and accuracy on the validation set (or its fixed sample, --val-sample, before the last epoch; with
    test-time augmentation at the last), each process taking its share. Where BatchNorm's running averages
    cannot keep up with an epoch, their exact values are computed first (batchnorm.py says why)."""
    order = 20

    def __init__(self, cfg: TrainConfig, ds: Dataset, device: torch.device, dtype: torch.dtype, world: dist.World, *,
                 val_sample: torch.Tensor | None = None, bn_sample: torch.Tensor | None = None, bn_batch: int = 0):
        self.cfg, self.ds, self.device, self.dtype, self.world = cfg, ds, device, dtype, world
        self.val_sample, self.bn_sample, self.bn_batch = val_sample, bn_sample, bn_batch
        self.last_logits: torch.Tensor | None = None  # the last epoch's validation logits, every image, with TTA

    def end_epoch(self, fit: Fit) -> None:
        s, epoch = fit.state, fit.state.epoch
        last = epoch == fit.epochs - 1
        t0 = time.perf_counter()
        if self.bn_sample is not None and not finetune.body_frozen(self.cfg, epoch):  # (a frozen body keeps its own)
            batchnorm.recompute(s.evaluated, fit.batches.x[self.bn_sample.to(self.device)], s.norm, self.device,
                                self.dtype, self.bn_batch)
        val_loss, val_acc, logits = self.validate(s.evaluated, s.norm, last)
        if last:  # the final weights, with TTA: what calibration and (validating on the test set) the run's
            self.last_logits = dist.gather_shards(self.world, logits)  # evaluation would otherwise compute again
        t = fit.totals
        loss, correct, seen = dist.all_sum(self.world, [t["loss"], t["correct"], t["seen"]], self.device)
        fit.record = {"epoch": epoch + 1, "train_loss": loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                      "val_loss": val_loss, "val_acc": val_acc, "seconds": round(s.seconds, 3),
                      "images_per_s": round(seen / max(s.seconds, 1e-9), 1),
                      "val_seconds": round(time.perf_counter() - t0, 3)}
        s.history.append(fit.record)

    @property
    def test_logits(self) -> torch.Tensor | None:
        """The last validation's logits when the validation set is the test set."""
        return self.last_logits if self.ds.y_val is None else None

    def validate(self, model, norm, last: bool) -> tuple[float, float, torch.Tensor]:
        """Loss, accuracy (summed over processes, not repeated) and this process's logits of its share."""
        x, y = self.ds.validation
        if self.val_sample is not None and not last:
            x, y = x[self.val_sample], y[self.val_sample]
        tta = self.cfg.tta if last else 0  # test-time augmentation multiplies the cost: only for the final weights
        x, y = dist.shard(self.world, x), dist.shard(self.world, y)
        logits = evaluate.predict_logits(model, x, norm, self.device, self.dtype, self.cfg.eval_batch_size, tta=tta)
        loss = F.cross_entropy(logits, y, reduction="sum").item() if len(y) else 0.0
        correct = (logits.argmax(1) == y).sum().item() if len(y) else 0
        loss_sum, correct, count = dist.all_sum(self.world, [loss, correct, len(y)], self.device)
        return loss_sum / max(count, 1), correct / max(count, 1), logits


class History(Hook):
    order = 30

    def __init__(self, run: Run | None):
        self.run = run  # process 0's; None on the others

    def end_epoch(self, fit: Fit) -> None:
        if self.run is not None:
            self.run.write_history(fit.state.history)


class Checkpoints(Hook):
    """A checkpoint after each epoch, every `every` steps and when stopped, into the run (which owns the file
    names and writes atomically, keeping the previous one). Every process takes part (the totals are summed over
    processes); process 0 writes."""
    order = 40

    def __init__(self, run: Run, world: dist.World, every: int = 0):
        self.run, self.world, self.every = run, world, every
        self.epochs: int | None = None  # what config.json says

    def save(self, fit: Fit) -> None:
        state = fit.state.state_dict(self.world)
        if self.world.main:
            self.record_epochs(fit.epochs)
            self.run.save_checkpoint(state)

    def record_epochs(self, epochs: int) -> None:
        """config.json's epochs follow a re-planned run (Fit.replan), before the checkpoint that depends on them:
        a resume reads both."""
        if epochs != self.epochs and self.run.config()["train"]["epochs"] != epochs:
            self.run.set_epochs(epochs)
        self.epochs = epochs

    def after_step(self, fit: Fit) -> None:
        if self.every and fit.state.step % self.every == 0 and not fit.last_step:
            fit.sync()  # never checkpoint a state after a non-finite step under --on-nan stop
            fit.state.epoch_rng = fit.batches.rng_state()
            self.save(fit)

    before_stop = after_epoch = save


class Trackers(Hook):
    order = 50

    def __init__(self, trackers):
        self.trackers = trackers

    def after_sync(self, fit: Fit, totals: dict) -> None:
        if totals["seen"]:  # process 0's share: the running means of the epoch so far
            self.trackers.step(fit.state.epoch * fit.batches.steps + fit.state.step, {
                "train_loss": totals["loss"] / totals["seen"], "train_acc": totals["correct"] / totals["seen"],
                "lr": fit.state.optimizer.param_groups[0]["lr"]})

    def end_epoch(self, fit: Fit) -> None:
        self.trackers.epoch(fit.record, fit.state.optimizer.param_groups[0]["lr"])


class Monitor(Hook):
    """The monitored value (--monitor) decides the best epoch (its weights kept in best.safetensors), early
    stopping, and the plateau schedule's learning rate."""
    order = 60

    def __init__(self, cfg: TrainConfig, run: Run | None):
        self.cfg, self.run = cfg, run  # run: process 0's, which writes the best weights

    def end_epoch(self, fit: Fit) -> None:
        s, cfg, record = fit.state, self.cfg, fit.record
        value = record[cfg.monitor]
        if hasattr(s.schedule, "epoch_end"):  # plateau: the learning rate follows the monitored value
            s.schedule.epoch_end(value)
        if improves(value, s.best.get("value"), lower_is_better=cfg.monitor == "val_loss"):
            s.best = {"epoch": record["epoch"], "value": value, "since": 0}
            if self.run is not None:
                self.run.save_best(cpu_weights(s.evaluated), record["epoch"])
        else:
            s.best["since"] += 1
        fit.stop_early = (bool(cfg.early_stopping) and s.best["since"] >= cfg.early_stopping
                          and record["epoch"] < fit.epochs)


class Governor(Hook):
    order = 70

    def __init__(self, governor: ThreadGovernor):
        self.governor = governor

    def after_sync(self, fit: Fit, totals: dict) -> None:
        self.governor.tick()


class EpochLog(Hook):
    """The epoch's line (Keras' format), early stopping, skipped steps, and validation stuck at chance."""
    order = 80

    def __init__(self, cfg: TrainConfig, ds: Dataset):
        self.cfg, self.ds, self.warned_chance = cfg, ds, False

    def after_epoch(self, fit: Fit) -> None:
        r, cfg = fit.record, self.cfg
        log.info(f"Epoch {r['epoch']}/{fit.epochs} - {r['seconds']:.1f}s - {r['images_per_s']:,.0f} img/s - "
                 f"loss {r['train_loss']:.4f} - acc {r['train_acc']:.4f} - "
                 f"val_loss {r['val_loss']:.4f} - val_acc {r['val_acc']:.4f} - validation {r['val_seconds']:.1f}s")
        if fit.stop_early and cfg.early_stopping and fit.state.best.get("since", 0) >= cfg.early_stopping:
            log.info(f"early stopping: {cfg.monitor} has not improved for {cfg.early_stopping} epoch"
                     f"{'s' * (cfg.early_stopping != 1)} (best: epoch {fit.state.best['epoch']}); training ends here")
        if fit.totals["skipped"]:  # the same steps on every process: not summed
            log.info(f"warning: {int(fit.totals['skipped'])} batches of epoch {r['epoch']} were skipped "
                     "(non-finite loss)")
        self.warn_at_chance(r)

    def warn_at_chance(self, record: dict) -> None:
        """Training accuracy that climbs while validation stays at chance (the share of the largest class)
        means held-out images are all given one class: say so once, with the usual causes."""
        y = self.ds.validation[1]
        chance = torch.bincount(y, minlength=self.ds.num_classes).max().item() / max(len(y), 1)
        if self.warned_chance or record["epoch"] < 2 or record["val_acc"] > chance + 0.02 \
                or record["train_acc"] < chance + (1 - chance) / 3:
            return
        self.warned_chance = True
        log.info(f"warning: validation accuracy {record['val_acc']:.1%} is at chance ({chance:.1%}, the largest "
                 f"class's share) while training accuracy reached {record['train_acc']:.1%}: held-out images all "
                 "get nearly one class. Check that validation images are labelled and prepared as the training ones "
                 "are; a learning rate too high for the network (--lr) or too few images for it (a smaller --model, "
                 "or --pretrained weights) are the usual causes")


class CtrlC(Hook):
    """While training, the first Ctrl-C (or SIGTERM, which schedulers send before they kill) asks the loop to
    stop and checkpoint; a second one aborts. (Only the main thread can install signal handlers.)"""
    order = 90

    def __init__(self):
        self.previous: dict = {}  # the handlers to put back (none when a hook before this one failed first)

    def before_fit(self, fit: Fit) -> None:
        STOP.clear()
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def handler(signum, frame) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\n{what}: stopping after this step and saving a checkpoint ({what} again to abort)", flush=True)

    def after_fit(self, fit: Fit) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous = {}


class NoHostSync(Hook):
    """A check for a GPU (benchmarks/gpu_check.py, tests/test_gpu.py), not a default hook: every step runs under
    torch.cuda.set_sync_debug_mode("error"), so an operation that makes the host wait for the GPU (a read of a
    value, a copy from pageable memory) raises where it is; the loop's own reads of the totals (every SYNC_EVERY
    steps) and the epoch's end (validation, checkpoints) run with the mode off. `set_mode` sets the mode
    (torch.cuda.set_sync_debug_mode; a test may record the calls instead)."""

    def __init__(self, set_mode=None):
        self.set_mode = set_mode or torch.cuda.set_sync_debug_mode

    def before_epoch(self, fit: Fit) -> None:
        self.set_mode("error")

    def after_step(self, fit: Fit) -> None:
        if fit.reading:  # the loop reads the totals next
            self.set_mode(0)

    def after_sync(self, fit: Fit, totals: dict) -> None:
        if not fit.last_step:  # (runs after the default hooks, which look at the totals read)
            self.set_mode("error")

    def after_fit(self, fit: Fit) -> None:
        self.set_mode(0)
