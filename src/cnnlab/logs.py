"""What cnnlab says: one `logging` logger per module under "cnnlab", printed as plain lines on standard output.

    log = logging.getLogger(__name__)    # in every module that speaks
    log.info("run directory: %s", run)

Output is what the user sees, unchanged from print(): the message alone, flushed at once (progress shows up
in logs and pipes as it happens). Under several processes only process 0 speaks (`MainProcess`, from the
RANK that torchrun sets), so no function needs a `log` argument or a quiet twin for the other ranks.

Callers that want the lines (tests, a notebook, a service) add a handler to `logging.getLogger("cnnlab")`;
`captured()` does that for a block of code. `quiet()` silences standard output for a block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

ROOT = "cnnlab"


class Stdout(logging.Handler):
    """The message alone on the current sys.stdout (looked up at each line, so redirections apply), flushed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stdout, flush=True)
        except Exception:  # noqa: BLE001  (logging's own rule: a failing handler never breaks the program)
            self.handleError(record)


class MainProcess(logging.Filter):
    """Pass lines of process 0 only (RANK is unset outside torchrun: one process, which is process 0)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return os.environ.get("RANK", "0") == "0"


def setup() -> logging.Logger:
    """The "cnnlab" logger with its standard-output handler, once. It does not propagate to the root logger, so
    an application's own logging configuration never prints cnnlab's lines twice."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, Stdout) for h in logger.handlers):
        handler = Stdout()
        handler.addFilter(MainProcess())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured(quiet: bool = True) -> Iterator[list[str]]:
    """The lines cnnlab says inside the block, as a list (also left off standard output unless `quiet` is False)."""
    logger, lines = setup(), []
    handler = _Lines(lines)
    logger.addHandler(handler)
    stdout = [h for h in logger.handlers if isinstance(h, Stdout)]
    for h in stdout:
        h.setLevel(logging.CRITICAL + 1 if quiet else logging.NOTSET)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        for h in stdout:
            h.setLevel(logging.NOTSET)

