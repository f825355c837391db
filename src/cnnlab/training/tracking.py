"""Experiment tracking beside the run directory: `--log tensorboard` and `--log mlflow` (either or both).

TensorBoard: event files in RUN_DIR/tensorboard (`tensorboard --logdir runs`): the running training loss and
accuracy every host look (20 steps), loss, accuracy, learning rate and seconds per epoch, the confusion matrix
as an image and the hyperparameters with the final metrics. MLflow: one MLflow run per cnnlab run (its id is
kept in RUN_DIR/tracking.json, so --resume continues it), with the settings as parameters, the metrics per
epoch and at the end, and the run directory's files (not its checkpoints) as artifacts. The tracking URI is
`--mlflow-uri`, else $MLFLOW_TRACKING_URI, else a SQLite database beside the run (RUN_DIR/../mlflow.db): MLflow
3 no longer takes its old ./mlruns file store, and mlflow-skinny cannot use SQLite, hence the full `mlflow`
package (the `cnnlab[tracking]` extra). Only process 0 of a multi-process run tracks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cnnlab.errors import CnnlabError
from cnnlab.run import Run

KINDS = ("tensorboard", "mlflow")
SKIPPED_ARTIFACTS = (Run.CHECKPOINT, Run.PREVIOUS, Run.TENSORBOARD, Run.TRACKING)


class Trackers:
    """The trackers a run asked for, called together; no tracker at all costs nothing."""

    def __init__(self, run_dir: Path, kinds: list[str], config: dict, mlflow_uri: str | None = None):
        self.all = [_make(kind, run_dir, config, mlflow_uri) for kind in kinds]

    def step(self, step: int, values: dict[str, float]) -> None:
        for t in self.all:
            t.step(step, values)

    def epoch(self, record: dict, lr: float) -> None:
        for t in self.all:
            t.epoch(record, lr)

    def finish(self, run_dir: Path, metrics: dict, draw_confusion=None) -> None:
        """The final metrics; `draw_confusion()` makes the confusion-matrix figure (matplotlib: only when a
        tracker shows it)."""
        for t in self.all:
            t.finish(run_dir, metrics, draw_confusion)


def check(kinds: list[str]) -> None:
    """Before any data is read: each kind known and its package importable, or one line on what to install."""
    for kind in kinds:
        if kind not in KINDS:
            raise CnnlabError(f"unknown --log {kind!r}; use {' or '.join(KINDS)}")
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[kind]
        try:
            __import__(module)
        except ImportError:
            raise CnnlabError(f"--log {kind} needs the {module} package: pip install 'cnnlab[tracking]'") from None


def _make(kind: str, run_dir: Path, config: dict, mlflow_uri: str | None):
    return TensorBoard(run_dir, config) if kind == "tensorboard" else MLflow(run_dir, config, mlflow_uri)


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as `train.lr`-style keys with string values (what hyperparameter tables take)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list) or len(v) <= 8:  # class lists and skipped files are not parameters
            out[f"{prefix}{k}"] = str(v)
    return out


def budget_parent(run_dir: Path) -> dict | None:
    """A --budget trial (RUN/search/trial-NNN) is a child run of its budget run: that run's MLflow record."""
    record = run_dir.parent.parent / Run.TRACKING
    if run_dir.parent.name != Run.SEARCH or not record.is_file():
        return None
    return json.loads(record.read_text())


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Run(run_dir).file(Run.TENSORBOARD)))
        self.params = _flat({k: config[k] for k in ("preset", "train") if k in config})

    def step(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"step/{name}", value, step)

    def epoch(self, record: dict, lr: float) -> None:
        e = record["epoch"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "seconds", "val_seconds"):
            if key in record:
                self.writer.add_scalar(f"epoch/{key}", record[key], e)
        self.writer.add_scalar("epoch/lr", lr, e)
        self.writer.flush()

    def finish(self, run_dir: Path, metrics: dict, draw_confusion=None) -> None:
        if draw_confusion is not None:
            self.writer.add_figure("confusion_matrix", draw_confusion())
        final = {f"hparam/{k}": metrics[k] for k in ("test_accuracy", "test_loss", "test_balanced_accuracy")
                 if k in metrics}
        self.writer.add_hparams(self.params, final, run_name=".")
        self.writer.close()


class MLflow:
    def __init__(self, run_dir: Path, config: dict, uri: str | None):
        import mlflow

        self.mlflow = mlflow
        self.parent = budget_parent(run_dir)
        uri = (uri or (self.parent or {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = self._run(run_dir, config, uri)

    def _run(self, run_dir: Path, config: dict, uri: str) -> str:
        """This cnnlab run's MLflow run: the one recorded in tracking.json (a resumed run), else a new one."""
        from cnnlab import files

        record = Run(run_dir).file(Run.TRACKING)
        if record.is_file():
            return json.loads(record.read_text())["mlflow_run_id"]
        experiment = self.client.get_experiment_by_name("cnnlab")
        if experiment is None:
            local = uri.startswith("sqlite:")  # artifacts beside the database, not in the current directory
            where = (run_dir.resolve().parent / "mlflow-artifacts").as_uri() if local else None
            experiment_id = self.client.create_experiment("cnnlab", artifact_location=where)
        else:
            experiment_id = experiment.experiment_id
        tags = {"mlflow.parentRunId": self.parent["mlflow_run_id"]} if self.parent else None  # MLflow's nesting
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        for key, value in list(_flat(config).items())[:500]:
            self.client.log_param(run.info.run_id, key, value[:6000])
        files.write_json(record, {"mlflow_run_id": run.info.run_id, "tracking_uri": uri})
        return run.info.run_id

    def step(self, step: int, values: dict[str, float]) -> None:
        pass  # per epoch is MLflow's grain here: per-step points would be a request every 20 steps

    def epoch(self, record: dict, lr: float) -> None:
        e = record["epoch"]
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "seconds", "val_seconds"):
            if key in record:
                self.client.log_metric(self.run_id, key, record[key], step=e)
        self.client.log_metric(self.run_id, "lr", lr, step=e)

    def finish(self, run_dir: Path, metrics: dict, draw_confusion=None) -> None:
        for key, value in metrics.items():
            if key.startswith("test_") and isinstance(value, int | float):
                self.client.log_metric(self.run_id, key, value)
        for path in sorted(run_dir.iterdir()):
            if path.name not in SKIPPED_ARTIFACTS and path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)
