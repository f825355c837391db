"""The exceptions users see: the CLI prints their message as a single line."""

from __future__ import annotations

from pathlib import Path


class CnnlabError(Exception):
    """A problem the user can fix (bad path, bad data, bad flag). The CLI prints it and exits 2."""


class EveryProcessError(CnnlabError):
    """A CnnlabError that every training process meets at the same step (they decide together, e.g. a
    non-finite loss); under several processes process 0 alone prints it."""


class Interrupted(Exception):
    """Training stopped on request after saving a checkpoint. The CLI exits 130."""

    def __init__(self, run_dir: Path):
        super().__init__(f"interrupted; checkpoint saved. Continue with: cnnlab train --resume {run_dir}")
        self.run_dir = run_dir
