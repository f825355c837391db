"""The budget's clock, and the hook that keeps a training run inside it.

The clock counts wall time from the start of `train_within`, except what it is told to leave out (decoding
data into the cache for the first time: `with clock.excluded("decoding into the cache")`), which the log states. A run
trained under a `Deadline` checks after each epoch whether the next one, at the pace measured so far, still
ends before the deadline (less what the run's end needs); if not, the run ends there and says so. So a
machine that slows down mid-run (another job starting) shortens the run instead of overrunning the budget.
"""

from __future__ import annotations

import contextlib
import logging
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
    seconds (what the run's end needs: the final evaluation), at the pace of the epochs so far."""
    order = 95  # after the record of the epoch is made (Validate) and the monitor has spoken

    def __init__(self, clock: Clock, share: float = 1.0, reserve: float = 0.0, world: World | None = None):
        self.clock, self.share, self.reserve, self.world = clock, share, reserve, world or World()
        self.started, self.epochs, self.stopped_at = 0.0, 0, None

    def before_fit(self, fit) -> None:
        self.started = time.monotonic()

    def end_epoch(self, fit) -> None:
        done, self.epochs = fit.record["epoch"], self.epochs + 1
        pace = (time.monotonic() - self.started) / self.epochs
        late = done < fit.epochs and time.monotonic() + pace > self.clock.deadline(self.share) - self.reserve
        if dist.any_rank(self.world, late, fit.state.device):  # every process stops at the same epoch
            fit.stop_early = True
            self.stopped_at = done
            log.info(f"budget: ending after epoch {done} of {fit.epochs}: at {pace:.1f} s an epoch the next would end "
                     f"past the budget")
