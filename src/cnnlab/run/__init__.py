"""The run directory, owned by one `Run`: the only code that knows its file names.

    config.json                  resolved configuration (preset, data, training, outputs, environment)
    history.csv / history.json   one record per epoch
    checkpoint.safetensors       the last state for --resume (weights, optimizer, schedule, RNG, position),
    checkpoint.prev.safetensors  and the one before it, kept until the new one is complete
    best.safetensors             the best epoch's weights so far
    model.safetensors            the final weights,
    model.json                   and what evaluation and prediction need besides them (written last: the commit)
    metrics.json, confusion_matrix.{csv,json,png}, report.html, model.onnx, tracking.json

    run = Run.create(out="runs/quick")     # a new run (training); Run("runs/quick") opens an existing one
    run.config(), run.history(), run.meta(), run.weights(), run.metrics()

Every write is atomic (a temporary name, then a rename: files.py). The weights are committed in order:
model.safetensors (with the SHA-256 of its tensors in its header), then model.json with the same digest; every
reader checks them against it, so a damaged file is an error instead of silently wrong predictions.

Reading JSON needs no PyTorch (`cnnlab runs` starts in a blink; an ONNX prediction reads model.json); the
tensor files are read and written through run/tensors.py, which imports PyTorch when it is used.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cnnlab import files
from cnnlab.errors import CnnlabError
from cnnlab.run import tensors

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s", "val_seconds"]


class Run:
    """A run directory: it alone knows the file names in it, and reads and writes each atomically
    (`Run(path)`; `run.config()`, `run.history()`, `run.meta()`, `run.metrics()`)."""
    CONFIG, HISTORY, HISTORY_CSV = "config.json", "history.json", "history.csv"
    CHECKPOINT, PREVIOUS, LEGACY_CHECKPOINT = "checkpoint.safetensors", "checkpoint.prev.safetensors", "checkpoint.pt"
    WEIGHTS, META, BEST = "model.safetensors", "model.json", "best.safetensors"
    METRICS, EVALUATIONS = "metrics.json", "evaluations"  # evaluations/<data>/: metrics on other data
    EXPLANATIONS = "explanations"  # `cnnlab explain`'s overlays, by default
    CONFUSION_CSV, CONFUSION_JSON = "confusion_matrix.csv", "confusion_matrix.json"
    CONFUSION_PNG = "confusion_matrix.png"
    REPORT, ONNX, TRACKING, TENSORBOARD = "report.html", "model.onnx", "tracking.json", "tensorboard"
    ONNX_INT8, OPENVINO = "model.int8.onnx", "openvino"  # `export --int8`; `--format openvino`: a folder (-int8)
    SEARCH, TRIALS = "search", "trials.csv"  # --budget: the search (study, trials' runs) and its leaderboard
    SEARCH_FILES = {SEARCH, TRIALS, TRACKING}  # what a budget run's folder holds before its final run starts
    # What the end of a run writes after its weights, in order; the pictures not with --no-report.
    END_FILES = (METRICS, CONFUSION_CSV, CONFUSION_JSON)
    PICTURES = (CONFUSION_PNG, REPORT)

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """The path of one of the run's files (names: the class constants)."""
        return self.path / name

    @classmethod
    def of(cls, run: Run | str | os.PathLike) -> Run:
        """A `Run` for what callers hold: a Run already, or its path."""
        return run if isinstance(run, Run) else cls(run)

    @staticmethod
    def is_run(path: str | os.PathLike) -> bool:
        return (Path(path) / Run.CONFIG).is_file()

    @staticmethod
    def is_finished(path: str | os.PathLike) -> bool:
        """Whether `path` holds a finished run's model metadata (model.json): what --init-from and a run given
        as --pretrained need."""
        return (Path(path) / Run.META).is_file()

    # -- making and discarding ------------------------------------------------------------------------

    @staticmethod
    def check_out(out: str | os.PathLike) -> None:
        """--out must be new, or an empty folder (or one holding only a --budget search, whose final run it
        becomes): never a run (that is --resume) nor a folder of other files."""
        out = Path(out)
        if (out / Run.CONFIG).exists():
            raise CnnlabError(f"{out} already holds a run; use --resume {out} or another --out")
        if out.is_dir() and {p.name for p in out.iterdir()} - Run.SEARCH_FILES:
            raise CnnlabError(f"{out} is a folder of other files, not a cnnlab run; choose a new or empty --out")
        if out.exists() and not out.is_dir():
            raise CnnlabError(f"--out {out} is a file; choose a new or empty folder")

    @classmethod
    def create(cls, out: str | os.PathLike | None = None, root: str | os.PathLike = "runs",
               preset: str = "custom") -> Run:
        """The folder `out` (checked by `check_out` before the data was read), or a new `root/<time>-<preset>`,
        made unique with a counter if two runs start in the same second."""
        try:
            if out is not None:
                Path(out).mkdir(parents=True, exist_ok=True)
                return cls(out)
            path = cls.new_path(root, preset)
            path.mkdir(parents=True)
            return cls(path)
        except OSError as e:
            raise CnnlabError(f"cannot create the run directory {out or root}: {e.strerror or e}") from None

    @staticmethod
    def new_path(root: str | os.PathLike, preset: str) -> Path:
        """`root/<time>-<preset>`, made unique with a counter if two runs start in the same second."""
        base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{preset}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
        return path

    def discard(self, created: bool) -> None:
        """A run refused before its first checkpoint (no disk space, a non-finite first step, ...) leaves nothing:
        the same command can then simply be run again. One that checkpointed is kept for --resume."""
        if self.has_checkpoint():
            return
        for name in (self.CONFIG, self.HISTORY_CSV, self.HISTORY):
            self.file(name).unlink(missing_ok=True)
        if created:
            try:
                self.path.rmdir()  # only when nothing else is in it
            except OSError:
                pass

    def remove_leftovers(self) -> None:
        """Temporary files a kill cut short; never a file anything reads."""
        for leftover in self.path.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def missing_end(self, with_report: bool) -> list[str]:
        """Which of the files the end of a run writes are missing."""
        wanted = (*self.END_FILES, *(self.PICTURES if with_report else ()))
        return [name for name in wanted if not self.file(name).exists()]

    # -- JSON: configuration, history, metrics ----------------------------------------------------------

    def read_json(self, name: str, what: str) -> Any:
        return read_json(self.file(name), what)

    def config(self) -> dict:
        """config.json, checked to be a run's: an object with "train" and "data" objects."""
        config = self.read_json(self.CONFIG, "is it a run directory?")
        if not (isinstance(config, dict) and all(isinstance(config.get(k), dict) for k in ("train", "data"))):
            raise CnnlabError(f"{self.file(self.CONFIG)} is not a cnnlab run configuration (it needs \"train\" "
                              "and \"data\" objects); it was damaged or written by something else")
        return config

    def write_config(self, config: dict) -> None:
        files.write_json(self.file(self.CONFIG), config)

    def set_epochs(self, epochs: int, config: dict | None = None, write: bool = True) -> dict:
        """config.json (or `config`) with the run's length changed, as a resume with --epochs N extends it and
        a budget's final run re-plans it; written unless `write` is False (a process other than the first)."""
        config = config if config is not None else self.config()
        config = {**config, "train": {**config["train"], "epochs": epochs}}
        if write:
            self.write_config(config)
        return config

    def history(self, what: str = "has it finished an epoch?") -> list[dict]:
        return self.read_json(self.HISTORY, what)

    def write_history(self, history: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        files.write_text(self.file(self.HISTORY_CSV), buf.getvalue())
        files.write_json(self.file(self.HISTORY), history)

    def metrics(self) -> dict | None:
        """metrics.json, or None before the run has been evaluated."""
        return self.read_json(self.METRICS, "") if self.file(self.METRICS).is_file() else None

    def recorded_accuracy(self) -> float | None:
        """The run's test accuracy from metrics.json, or None before it has been evaluated."""
        return (self.metrics() or {}).get("test_accuracy")

    def write_metrics(self, metrics: dict) -> None:
        files.write_json(self.file(self.METRICS), metrics)

    def write_confusion(self, table_csv: str, matrix: dict) -> None:
        files.write_text(self.file(self.CONFUSION_CSV), table_csv)
        files.write_json(self.file(self.CONFUSION_JSON), matrix)

    # -- checkpoints ----------------------------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        return any(self.file(name).exists() for name in (self.CHECKPOINT, self.PREVIOUS))

    def save_checkpoint(self, state: dict) -> None:
        """Write the checkpoint atomically; the previous one becomes checkpoint.prev.safetensors."""
        blob = tensors.checkpoint_bytes(state)
        with files.atomic_path(self.file(self.CHECKPOINT), backup=self.file(self.PREVIOUS)) as tmp:
            tmp.write_bytes(blob)

    def load_checkpoint(self) -> dict | None:
        """The newest intact checkpoint, or None if the run never wrote one. A damaged latest checkpoint falls
        back to the previous one, and says so."""
        problems = []
        for name in (self.CHECKPOINT, self.PREVIOUS):
            if not self.file(name).is_file():
                continue
            try:
                state = tensors.read_checkpoint(self.file(name))
            except ValueError as e:
                problems.append(f"{name}: {e}")
                continue
            if problems:
                log.info(f"warning: {problems[0]}; resuming from the previous checkpoint "
                    f"(epoch {state['epoch'] + 1}, step {state['step']})")
            return state
        if self.file(self.LEGACY_CHECKPOINT).is_file():  # written by cnnlab 0.1
            import torch

            try:
                return torch.load(self.file(self.LEGACY_CHECKPOINT), map_location="cpu", weights_only=True)
            except Exception as e:
                problems.append(f"{self.LEGACY_CHECKPOINT}: {e}")
        if problems:
            raise CnnlabError(f"no usable checkpoint in {self.path}: {'; '.join(problems)}")
        return None

    # -- weights ----------------------------------------------------------------------------------------

    def save_model(self, weights: dict, meta: dict) -> None:
        """Final weights (CPU tensors) and the metadata that makes them usable on their own, committed in order."""
        blob, sha = tensors.weights_bytes(weights)
        files.write_bytes(self.file(self.WEIGHTS), blob)
        files.write_json(self.file(self.META), {**meta, "sha256": sha})

    def meta(self, what: str = "it is not a complete training run") -> dict:
        """model.json as training writes it, checked before a network is built from it (a damaged or hand-edited
        file must be an error, not a 40,000 x 40,000 allocation nor a TypeError deep inside)."""
        meta = self.read_json(self.META, what)
        if not (isinstance(meta, dict) and all(check(meta[key]) if key in meta else key in OPTIONAL
                                               for key, check in META_CHECKS.items())):
            raise CnnlabError(f"{self.file(self.META)} is not what cnnlab training writes (model, classes, 1 or 3 "
                              "input channels, an image size of 1-4096 px per side, normalization); it was damaged "
                              "or edited")
        return meta

    def weights(self, meta: dict | None = None) -> dict:
        """The final weights, checked against the digest model.json recorded (runs before it had none)."""
        meta = self.meta() if meta is None else meta
        path = self.file(self.WEIGHTS)
        try:
            weights, _ = tensors.read_weights(path)
        except FileNotFoundError:
            raise CnnlabError(f"{self.path} has no weights ({self.WEIGHTS}); is it a finished training run?") from None
        except Exception as e:  # safetensors raises its own error types for damaged headers and data
            raise CnnlabError(f"cannot read weights {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
        if "sha256" in meta and tensors.digest("", weights) != meta["sha256"]:
            raise CnnlabError(f"{path} is damaged (its checksum does not match {self.META}); `cnnlab train --resume "
                              f"{self.path}` writes it again from the run's final checkpoint")
        return weights

    def model_complete(self) -> bool:
        """Whether the run has committed final weights that pass their checksum."""
        try:
            self.weights(self.meta())
        except CnnlabError:  # --resume writes both again from the final checkpoint
            return False
        return True

    def save_best(self, weights: dict, epoch: int) -> None:
        """The best epoch's weights so far, beside the checkpoint (see TrainConfig.keep)."""
        files.write_bytes(self.file(self.BEST), tensors.weights_bytes(weights, epoch=str(epoch))[0])

    def load_best(self) -> tuple[dict, int]:
        """best.safetensors' weights, checked against their digest, and their epoch."""
        path = self.file(self.BEST)
        try:
            weights, meta = tensors.read_weights(path)
        except Exception as e:
            raise CnnlabError(f"cannot read {path}: {e}; the run's last weights are intact") from None
        if tensors.digest("", weights) != meta.get("sha256"):
            raise CnnlabError(f"{path} is damaged (its checksum does not match)")
        return weights, int(meta["epoch"])

    def export_digest(self) -> str | None:
        """The weights' digest model.json records: what an export of these weights carries."""
        return json.loads(self.file(self.META).read_text()).get("sha256")


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CnnlabError(f"{Path(path).parent} has no {Path(path).name}; {what}") from None
    except (OSError, ValueError) as e:
        raise CnnlabError(f"cannot read {path}: {e}") from None


def _numbers(v: Any, low: float) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 3 and all(
        isinstance(x, int | float) and not isinstance(x, bool) and low <= x < 1e6 for x in v)


OPTIONAL = ("resize", "precision", "tta", "sha256")  # runs of older versions did not write them
META_CHECKS = {  # what each field of model.json must hold
    "model": lambda v: isinstance(v, str),
    "in_channels": lambda v: v in (1, 3) and not isinstance(v, bool),
    "classes": lambda v: isinstance(v, list) and 1 <= len(v) <= 100_000 and all(isinstance(c, str) for c in v),
    "image_size": lambda v: isinstance(v, list) and len(v) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 4096 for x in v),
    "normalization": lambda v: isinstance(v, dict) and _numbers(v.get("mean"), -1e6) and _numbers(v.get("std"), 1e-12),
    "resize": lambda v: v in ("crop", "pad", "squish"),
    "precision": lambda v: v in ("fp32", "bf16", "fp16"),
    "tta": lambda v: v in (0, 1, 2) and not isinstance(v, bool),
    "sha256": lambda v: isinstance(v, str),
}


def list_runs(root: str | os.PathLike) -> list[dict]:
    """One summary per run directory under `root` (those with a config.json), oldest first. A run whose files
    are damaged is listed as such, never fatal to the listing."""
    root = Path(root)
    if not root.is_dir():
        raise CnnlabError(f"runs folder {root} does not exist")
    rows = []
    for d in sorted(p for p in root.iterdir() if Run.is_run(p)):
        try:
            rows.append(_summary(Run(d)))
        except (OSError, ValueError, TypeError, KeyError, AttributeError, CnnlabError) as e:
            rows.append({"name": d.name, "path": str(d), "preset": "(damaged)", "model": type(e).__name__,
                         "epochs": 0, "planned_epochs": None, "test_accuracy": None, "train_seconds": 0.0, "date": ""})
    return rows


def _summary(run: Run) -> dict:
    config = json.loads(run.file(Run.CONFIG).read_text())
    history = json.loads(run.file(Run.HISTORY).read_text()) if run.file(Run.HISTORY).is_file() else []
    metrics = json.loads(run.file(Run.METRICS).read_text()) if run.file(Run.METRICS).is_file() else {}
    return {"name": run.path.name, "path": str(run.path), "preset": str(config.get("preset", "")),
            "model": str(config.get("train", {}).get("model", "")), "epochs": len(history),
            "planned_epochs": config.get("train", {}).get("epochs"),
            "test_accuracy": float(metrics["test_accuracy"]) if metrics.get("test_accuracy") is not None else None,
            "train_seconds": round(sum(float(h["seconds"]) for h in history), 1),
            "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.file(Run.CONFIG).stat().st_mtime))}


def format_runs(rows: list[dict]) -> str:
    header = ["name", "preset", "model", "epochs", "test acc", "train s", "date"]
    table = [[r["name"], r["preset"], r["model"],
              f"{r['epochs']}/{r['planned_epochs']}" if r["planned_epochs"] else "-",
              "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2%}", f"{r['train_seconds']:.1f}",
              r["date"]] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)
