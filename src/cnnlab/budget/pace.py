"""The budget's clock, and the hook that keeps a training run inside it.

The clock counts wall time from the start of `train_within`, except what it is told to leave out (decoding
data into the cache for the first time: `with clock.excluded("decoding into the cache")`), which the log states. A run
trained under a `Deadline` checks after each epoch whether the next one, at the pace measured so far, still
ends before the deadline (less what the run's end needs); if not, the run ends there and says so. So a
machine that slows down mid-run (another job starting) shortens the run instead of overrunning the budget.
The budget's final run also re-plans its length from its own pace after each epoch (Fit.replan).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

from cnnlab import dist
from cnnlab.dist import World
from cnnlab.training.hooks import Hook

log = logging.getLogger("cnnlab.budget")


class Clock:
    def __init__(self, seconds: float, spent: float = 0.0):
        self.seconds, self.started, self.left_out = seconds, time.monotonic() - spent, 0.0

    def spent(self) -> float:
        return time.monotonic() - self.started - self.left_out

    def left(self) -> float:
        return self.seconds - self.spent()

    def deadline(self, share: float = 1.0) -> float:
        """The monotonic time at which `share` of the budget will have been spent."""
        return self.started + self.left_out + self.seconds * share

    @contextlib.contextmanager
    def excluded(self, what: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - t0
            self.left_out += took
            if took >= 1:
                log.info(f"budget: {took:.0f} s of {what} not counted")

    def say(self, what: str) -> None:
        log.info(f"budget: {what}; {self.spent():.0f} s spent, {max(self.left(), 0):.0f} s left")


class Deadline(Hook):
    """End the run after the epoch whose successor would end past `clock.deadline(share)` less `reserve`
    seconds (what the run's end needs: the final evaluation), at the pace of the epochs so far.

    With `aim` (the seconds the run's end needs, without slack), it also re-plans: after each epoch, the
    epochs that end by `clock.deadline(share) - aim` at the run's own pace (its epochs after the first, which
    carries one-time costs; the first alone until there is a second) become the run's length (Fit.replan,
    at most `most`), so the schedule ends where the time does: a plan made from the trials' pace misjudged the
    final run's by 10-40% either way (photos at 2 minutes: 11 epochs of ~7 s planned, 6.2 s measured, 26 of the
    120 s left unused; CIFAR-10: ~12 s planned, 13-14 s measured). The plan is lengthened only while training
    is in its first three quarters and the extra epochs fit at 1.1x the pace (at 1.03x a photo run went from 15
    to 14, 13 and back to 14 epochs as its pace moved by 0.1 s), so the schedule is not moved back and forth."""
    order = 95  # after the record of the epoch is made (Validate) and the monitor has spoken

    def __init__(self, clock: Clock, share: float = 1.0, reserve: float = 0.0, world: World | None = None, *,
                 aim: float | None = None, least: int = 1, most: int = 100):
        self.clock, self.share, self.reserve, self.world = clock, share, reserve, world or World()
        self.aim, self.least, self.most = aim, least, most  # (least: a fine-tune's frozen epochs and one more)
        self.last, self.walls, self.stopped_at = 0.0, [], None

    def before_fit(self, fit) -> None:
        self.last = time.monotonic()

    def end_epoch(self, fit) -> None:
        now, done = time.monotonic(), fit.record["epoch"]
        self.walls.append(now - self.last)
        self.last = now
        pace = sum(self.walls[1:]) / (len(self.walls) - 1) if len(self.walls) > 1 else self.walls[0]
        late = done < fit.epochs and now + pace > self.clock.deadline(self.share) - self.reserve
        if dist.any_rank(self.world, late, fit.state.device):  # every process stops at the same epoch
            fit.stop_early = True
            self.stopped_at = done
            log.info(f"budget: ending after epoch {done} of {fit.epochs}: at {pace:.1f} s an epoch the next would end "
                     f"past the budget")
        elif self.aim is not None and done < fit.epochs:
            epochs = dist.broadcast(self.world, self.replanned(fit.epochs, done, pace, now) if self.world.main
                                    else None)
            if epochs != fit.epochs:
                log.info(f"budget: re-planned from {fit.epochs} to {epochs} epochs: at {pace:.1f} s an epoch, "
                         f"{epochs - done} more end in the {self.clock.deadline(self.share) - self.aim - now:.0f} s "
                         "left for training")
                fit.replan(epochs)

    def replanned(self, planned: int, done: int, pace: float, now: float) -> int:
        """The run's length from here: what fits, at least one epoch more (the stop rule above ends it where
        none does), never lengthened in the last quarter of the plan or before a second epoch is measured."""
        room = self.clock.deadline(self.share) - self.aim - now
        fits = done + max(1, math.floor(room / pace))
        if fits > planned:
            if len(self.walls) < 2 or done >= 0.75 * planned:
                return planned
            # lengthened only with a margin (no back and forth at the edge); the margin never shortens it
            fits = max(planned, done + math.floor(room / (1.1 * pace)))
        return max(self.least, min(fits, self.most))
