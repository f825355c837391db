"""The training loop: `fit(state, batches, step, hooks)`, one epoch after another, extended by hooks.

    fit(state, batches, step, [Validate(...), Checkpoints(run), Progress(), ...], epochs=15)

The loop knows nothing of directories, progress bars or trackers: each is a `Hook` (hooks.py), called at the
events below in list order. The loop body is a few lines because `batches` (data/loader.py) hands it
finished batches and `step` (step.py) does forward, backward and update:

    before_fit                       once
      before_epoch                   the epoch's position is state.epoch, state.step
        after_step                   after every step (a hook may set STOP: Ctrl-C, a test's fault)
        after_sync(totals)           every SYNC_EVERY steps and at the epoch's last: the host reads the totals
        before_stop                  a stop was requested mid-epoch: the last chance to checkpoint
      end_epoch                      validate, record, decide (fit.record, fit.stop_early)
      after_epoch                    the position moved to the next epoch: checkpoint, say how it went
    after_fit                        always, also after an error

The hot loop never waits for the device. The loss, the correct count and the skipped-step count add up on the
device; the host reads them every SYNC_EVERY steps (and at the end of an epoch) to update the progress bar,
to stop on a non-finite loss, and, under several processes, to agree on Ctrl-C. A read waits for the device
to finish its queue: a GPU queues ~20 small steps ahead in the time the host takes to launch them, and on a
CPU (where every op has already run when it returns) a read costs a few microseconds, so nothing is lost
either way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from cnnlab import dist
from cnnlab.data.loader import Batches
from cnnlab.dist import World
from cnnlab.training.state import TrainState
from cnnlab.training.step import Step

SYNC_EVERY = 20  # steps between host reads of the running totals (see above)
STOP = threading.Event()  # set to stop after the current step (Ctrl-C, SIGTERM); no update is cut in half


class Stopped(Exception):
    """The loop stopped on request, after the hooks' `before_stop` (which checkpoints)."""


class Hook:
    """Every event is optional: a hook overrides those it needs. `fit` is the running `Fit`. Hooks run in
    ascending `order` (as fastai's callbacks do); the default hooks take 0-90 (hooks.py), so a hook of
    your own runs after them unless it says otherwise (a test that rewrites the epoch's record takes 25:
    after Validate, before the history is written and the best epoch decided)."""

    order = 100

    def before_fit(self, fit: Fit) -> None: ...
    def before_epoch(self, fit: Fit) -> None: ...
    def after_step(self, fit: Fit) -> None: ...
    def after_sync(self, fit: Fit, totals: dict) -> None: ...
    def before_stop(self, fit: Fit) -> None: ...
    def end_epoch(self, fit: Fit) -> None: ...
    def after_epoch(self, fit: Fit) -> None: ...
    def after_fit(self, fit: Fit) -> None: ...


@dataclass
class Fit:
    """What hooks see: the state being trained, where the loop is, and what the epoch's end decided."""
    state: TrainState
    batches: Batches
    step: Step
    hooks: list[Hook]
    epochs: int
    world: World
    totals: dict | None = None  # this process's totals of the epoch, read at its end (TrainState.read)
    record: dict | None = None  # the epoch's record (end_epoch: validation makes it)
    stop_early: bool = False  # end_epoch: the run ends after this epoch (early stopping)

    @property
    def last_step(self) -> bool:
        return self.state.step == self.batches.steps

    @property
    def reading(self) -> bool:
        """Whether the host reads the totals after this step: every SYNC_EVERY steps and at the epoch's last."""
        return self.state.step % SYNC_EVERY == 0 or self.last_step

    def emit(self, event: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def replan(self, epochs: int) -> None:
        """Train `epochs` in all instead (from end_epoch, on every process alike: a time budget's final run
        re-planned from its own pace); the schedule is stretched or shrunk to end at the new last step, and the
        run's config.json says so from the next checkpoint on (hooks.Checkpoints)."""
        self.epochs = epochs
        self.state.set_total_steps(epochs * self.batches.steps)

    def sync(self) -> bool:
        """The host's look at the device: the totals to the hooks; whether any process was asked to stop."""
        self.emit("after_sync", self.state.read())
        return dist.any_rank(self.world, STOP.is_set(), self.state.device)  # torchrun signals each rank alone


def fit(state: TrainState, batches: Batches, step: Step, hooks: list[Hook], *, epochs: int,
        world: World = World()) -> Fit:
    """Train from `state`'s position to the end of `epochs`; raises Stopped when asked to stop."""
    run = Fit(state, batches, step, sorted(hooks, key=lambda h: h.order), epochs, world)
    try:
        run.emit("before_fit")
        while state.epoch < run.epochs:  # (a hook may re-plan it: Fit.replan)
            step.begin_epoch(state)
            run.emit("before_epoch")
            _run_epoch(run)
            _end_epoch(run)
    finally:
        step.release()
        run.emit("after_fit")
    return run


def _run_epoch(run: Fit) -> None:
    """The epoch's steps from `state.step` on; look at the host every SYNC_EVERY steps."""
    state = run.state
    t0 = time.perf_counter() - state.seconds
    for i, xb, yb in run.batches.epoch(state.epoch, state.step, state.epoch_rng):
        run.step(state, xb, yb, i)
        state.step, state.seconds = i + 1, time.perf_counter() - t0
        run.emit("after_step")
        stop = STOP.is_set() if not run.world.distributed else False  # one process: a free host-side look
        if run.reading or stop:
            stop = run.sync() or stop
        if stop and not run.last_step:  # after the last step the epoch ends first (validation, checkpoint)
            state.epoch_rng = run.batches.rng_state()
            run.emit("before_stop")
            raise Stopped


def _end_epoch(run: Fit) -> None:
    """Validate and decide (end_epoch), move to the next epoch, then checkpoint and report (after_epoch)."""
    state = run.state
    run.totals, run.record, run.stop_early = state.read(), None, False
    run.emit("end_epoch")
    state.epoch, state.step = (run.epochs if run.stop_early else state.epoch + 1), 0  # (an early stop: for resume too)
    state.epoch_rng = None
    state.reset_totals()
    run.emit("after_epoch")
    if dist.any_rank(run.world, STOP.is_set(), state.device):
        raise Stopped
