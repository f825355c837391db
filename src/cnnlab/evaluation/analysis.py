"""Where a trained classifier goes wrong: an interpretation object with verbs, after fastai's
ClassificationInterpretation.

    interp = Interpretation.from_run("runs/20261124-seed")
    interp.most_confused(5)            # [("cat", "dog", 212), ...]
    interp.plot_top_losses(16).savefig("top_losses.png")

Predictions, probabilities and per-image losses are computed once, in the constructor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cnnlab.config import TrainConfig, from_dict
from cnnlab.data import augment
from cnnlab.data.dataset import Dataset
from cnnlab.evaluation import calibration, evaluate, plots
from cnnlab.run import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Confusion:
    true: str
    predicted: str
    count: int


class Interpretation:
    """fastai-style analysis of a finished run: most confused pairs, top losses, and their plots
    (`Interpretation.from_run(run_dir)`)."""

    def __init__(self, classes: list[str], y_true: torch.Tensor, logits: torch.Tensor,
                 images: torch.Tensor | None = None, history: list[dict] | None = None,
                 train_images: torch.Tensor | None = None, train_labels: torch.Tensor | None = None,
                 augment_name: str = "none", files: tuple[str, ...] | list[str] = (), doubted: tuple[int, ...] = (),
                 calibrated: dict | None = None):
        self.classes = list(classes)
        self.y_true = y_true.long()
        self.logits = logits.float()
        self.calibrated = calibrated  # model.json's calibration record (None: a run trained before calibration)
        self.temperature = calibration.temperature_of({"calibration": calibrated})
        self.probs = (self.logits / self.temperature).softmax(1)  # calibrated: what predict and serve answer
        self.y_pred = self.logits.argmax(1)
        self.losses = F.cross_entropy(self.logits, self.y_true, reduction="none")
        self.images = images  # uint8 (N, C, H, W) test images, for pictures of mistakes
        self.history = history or []
        self.train_images, self.train_labels = train_images, train_labels
        self.augment_name = augment_name
        self.files = list(files) if len(files) == len(self.y_true) else []  # each test image's file, if known
        self.doubted = set(doubted)  # test images whose label `cnnlab data check --labels` doubts

    @classmethod
    def from_run(cls, run: Run | str | Path, data_path: str | None = None, *, dataset: Dataset | None = None,
                 device: str = "auto") -> Interpretation:
        """Evaluate a run's final weights on its test set (one pass, with the run's test-time augmentation)."""
        run = Run.of(run)
        logits, meta, ds = evaluate.run_test_logits(run, data_path, dataset=dataset, device=device)
        history = run.history() if run.file(Run.HISTORY).is_file() else []
        augment = from_dict(TrainConfig, run.config()["train"]).augment
        return cls.from_logits(ds, logits, history=history, augment=augment, classes=meta["classes"],
                               calibrated=meta.get("calibration"))

    @classmethod
    def from_logits(cls, ds: Dataset, logits: torch.Tensor, *, history: list[dict], augment: str,
                    classes: list[str] | None = None, calibrated: dict | None = None) -> Interpretation:
        """From test-set logits already computed (training's last validation pass, when it was the test set),
        with the run's history, augmentation and calibration as training holds them."""
        return cls(classes or ds.classes, ds.y_test, logits, ds.x_test, history, ds.x_train, ds.y_train,
                   augment, ds.test_files, ds.doubted.get("test", ()), calibrated)

    # -- numbers -------------------------------------------------------------------------------------

    @property
    def accuracy(self) -> float:
        return float((self.y_pred == self.y_true).float().mean()) if len(self.y_true) else float("nan")

    def top_k_accuracy(self, k: int = 5) -> float:
        """The share of images whose true class is among the k most probable."""
        return evaluate.top_k_accuracy(self.logits, self.y_true, k)

    def balanced_accuracy(self) -> float:
        """The mean recall over the classes that have test images."""
        return evaluate.balanced_accuracy(self.confusion_matrix())

    def confusion_matrix(self, normalize: str | None = None) -> np.ndarray:
        """Counts (true down, predicted across), or rates: "true" rows sum to 1, "pred" columns do."""
        cm = evaluate.confusion_matrix(self.y_true.numpy(), self.y_pred.numpy(), len(self.classes))
        if normalize is None:
            return cm
        axis = {"true": 1, "pred": 0}[normalize]
        return cm / np.maximum(cm.sum(axis, keepdims=True), 1)

    def classification_report(self) -> dict:
        """Per-class precision, recall, F1 and support, with macro and weighted averages."""
        return evaluate.per_class_scores(self.confusion_matrix(), self.classes)

    def most_confused(self, k: int = 10, min_count: int = 1) -> list[Confusion]:
        """The k most frequent (true, predicted) mistakes, most frequent first."""
        cm = self.confusion_matrix()
        np.fill_diagonal(cm, 0)
        order = np.argsort(-cm, axis=None, kind="stable")[:k]
        pairs = [Confusion(self.classes[i], self.classes[j], int(cm[i, j]))
                 for i, j in zip(*np.unravel_index(order, cm.shape), strict=True)]
        return [p for p in pairs if p.count >= min_count]

    def top_losses(self, k: int = 16) -> list[dict]:
        """The k test images with the highest loss: index, file (for image folders, else None), true and
        predicted class, probability, loss, and whether `cnnlab data check --labels` doubted its label."""
        losses, idx = self.losses.topk(min(k, len(self.losses)))
        return [{"index": int(i), "file": self.files[int(i)] if self.files else None,
                 "true": self.classes[int(self.y_true[i])], "predicted": self.classes[int(self.y_pred[i])],
                 "probability": float(self.probs[i].max()), "loss": float(loss), "doubted": int(i) in self.doubted}
                for loss, i in zip(losses, idx, strict=True)]

    # -- pictures --------------------------------------------------------------------------------------

    def plot_confusion_matrix(self, normalize: str | None = None, title: str | None = None) -> Figure:
        title = title or ("Confusion matrix" if normalize is None else "Confusion matrix (row-normalized)")
        return plots.plot_confusion_matrix(self.confusion_matrix(), self.classes, normalize=normalize, title=title)

    def plot_top_losses(self, k: int = 16) -> Figure:
        rows = self.top_losses(k)
        titles = [("label doubted\n" if r["doubted"] else "") + (f"{_short(r['file'])}\n" if r["file"] else "")
                  + f"{r['true']} / {r['predicted']}\n"
                  f"{r['probability']:.2f} (loss {max(r['loss'], 0.0):.2f})" for r in rows]  # never "-0.00"
        images = self.images[[r["index"] for r in rows]] if self.images is not None else None
        return plots.image_grid(images, titles, "Top losses: file, true / predicted class, probability",
                                 columns=4 if rows and rows[0]["file"] else 8, fontsize=13)

    def calibration(self) -> dict | None:
        """calibration.summary of the test set (None for a run trained before calibration existed)."""
        if not self.calibrated or not len(self.y_true):
            return None
        if not hasattr(self, "_calibration"):  # (cross-fitting refits: once, for metrics.json and the report)
            done = calibration.applied(self.logits, self.y_true, self.calibrated)
            self._confidence = done[1]
            self._calibration = calibration.summary(self.logits, self.y_true, self.calibrated, done)
        return self._calibration

    def plot_reliability(self) -> Figure:
        return plots.plot_reliability(self.calibration())

    def plot_coverage(self) -> Figure:
        summary = self.calibration()
        return plots.plot_coverage(self._confidence.numpy(), (self.y_pred == self.y_true).numpy(),
                                   summary["selective"]["threshold"], summary["target"])

    def heatmaps_of_top_losses(self, model, norm, k: int = 16) -> tuple[torch.Tensor, list[str]]:
        """Per top-loss image: the image, where the network looked for the class it predicted, and for the true
        class (explain.py), as uint8 (3k, 3, H, W) images with their titles."""
        from cnnlab.evaluation import explain

        rows = self.top_losses(k)
        idx = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        images = self.images[idx]
        colour = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        looked = [explain.overlay(images, explain.heatmaps(model, images, norm, t)) for t in (self.y_pred[idx],
                                                                                              self.y_true[idx])]
        pictures = torch.stack([colour, *looked], 1).flatten(0, 1)
        titles = [t for r in rows for t in (f"{r['true']} / {r['predicted']}\n{r['probability']:.2f}",
                                            f"looked for\n{r['predicted']}",
                                            f"looked for\n{r['true']}")]
        return pictures, titles

    def plot_per_class(self) -> Figure:
        return plots.plot_per_class(self.classification_report()["per_class"])

    def plot_history(self) -> Figure:
        return plots.plot_history(self.history)

    def plot_samples(self, per_class: int = 4, seed: int = 0) -> Figure:
        """Training images after the run's augmentation, `per_class` of each class (up to 10 classes)."""
        g = torch.Generator().manual_seed(seed)
        chosen = []
        for c in range(min(len(self.classes), 10)):
            idx = (self.train_labels == c).nonzero().flatten()
            chosen.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
        idx = torch.cat(chosen)
        x = self.train_images[idx].float() / 255
        x = augment.get(self.augment_name)(x, g, epoch=0, idx=idx).clamp(0, 1)
        images = (x * 255).round().to(torch.uint8)
        titles = [self.classes[int(c)] for c in self.train_labels[idx]]
        return plots.image_grid(images, titles, f"Training samples after augmentation ({self.augment_name})",
                                 columns=per_class * 2)


def _short(path: str) -> str:
    """A file for a caption: its folder and name (`cat/0005.jpg`); plots.image_grid shortens what does not fit."""
    return "/".join(Path(path).parts[-2:])
