"""Test-set evaluation (loss, accuracy, per-class scores, confusion matrix) and PyTorch prediction."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import data, models
from cnnlab.config import DataConfig, from_dict
from cnnlab.data.dataset import Dataset, Normalization
from cnnlab.data.loader import in_batches
from cnnlab.device import autocast, eval_batch, memory_named, pick_device, pick_precision
from cnnlab.errors import CnnlabError
from cnnlab.evaluation import calibration, plots, report
from cnnlab.run import Run


def tta_views(x: torch.Tensor, level: int) -> list[tuple[float, torch.Tensor]]:
    """(weight, batch) pairs to average logits over: 1 adds the mirror image, 2 adds 1-pixel shifts of both."""
    if level <= 0:
        return [(1.0, x)]
    views = [x, x.flip(3)]
    if level == 1:
        return [(0.5, v) for v in views]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[:, :, :-2, :-2], padded[:, :, 2:, 2:]
    shifted = [up_left, up_left.flip(3), down_right, down_right.flip(3)]
    return [(0.25, v) for v in views] + [(0.125, v) for v in shifted]


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, norm: Normalization, device: torch.device,
                   dtype: torch.dtype = torch.float32, batch_size: int = 1000, tta: int = 0) -> torch.Tensor:
    """Float32 logits on the CPU for a uint8 image tensor, computed in large batches."""
    was_training = model.training
    model.eval()
    out = []
    views = len(tta_views(torch.zeros(1, 1, 3, 3), tta))
    batch = eval_batch(batch_size, tuple(x.shape[1:]), device, views)
    with memory_named(None, batch):
        for xs in in_batches(x, batch, device):
            xb = norm(xs.to(device))
            logits = 0
            for weight, view in tta_views(xb, tta):
                with autocast(device, dtype):
                    logits = logits + weight * model(view.contiguous(memory_format=torch.channels_last)).float()
            out.append(logits.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def loss_and_accuracy(model, x, y, norm, device, dtype=torch.float32, batch_size=1000, tta=0) -> tuple[float, float]:
    logits = predict_logits(model, x, norm, device, dtype, batch_size, tta)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """cm[i, j] = how many images of true class i were predicted as class j."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_scores(cm: np.ndarray, classes: list[str]) -> dict:
    """Precision, recall, F1 and support per class, with macro and support-weighted averages."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    rows = [{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)]
    weights = support / max(support.sum(), 1)

    def avg(w):
        return {"precision": float((precision * w).sum()), "recall": float((recall * w).sum()),
                "f1": float((f1 * w).sum()), "support": int(support.sum())}
    return {"per_class": rows, "macro_avg": avg(np.full(len(classes), 1 / max(len(classes), 1))),
            "weighted_avg": avg(weights)}


def write_confusion_matrix(run: Run, cm: np.ndarray, classes: list[str], picture: bool = True) -> None:
    """confusion_matrix.csv and .json, and (`picture`) confusion_matrix.png, which costs matplotlib's import."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true \\ predicted", *classes])
    writer.writerows([c, *map(int, row)] for c, row in zip(classes, cm, strict=True))
    run.write_confusion(buf.getvalue(), {"classes": classes, "rows": "true", "columns": "predicted",
                                         "matrix": cm.tolist()})
    if picture:
        plots.save_figure(plots.plot_confusion_matrix(cm, classes), run.file(Run.CONFUSION_PNG))


def load_as_trained(config: dict, data_path: str | None, image_size: tuple[int, int] | None) -> Dataset:
    """The data set as a run's recorded data config read it (`data_path` overrides where it is). Runs
    recorded before `resize` existed squished images to size."""
    recorded = from_dict(DataConfig, {"resize": "squish", **config})
    return data.load(replace(recorded, path=data_path or config.get("path"), image_size=image_size))


def run_dataset(run: Run | str | Path, meta: dict, data_path: str | None = None, config: dict | None = None
                ) -> Dataset:
    """The data set a run was trained on (or `data_path`), checked against the run's classes and size. `config`:
    the run's config.json when the caller holds it already."""
    config = (config or Run.of(run).config())["data"]
    size = tuple(config["image_size"]) if config.get("image_size") else None
    for attempt in (size, tuple(meta["image_size"])):  # the run's own setting first: same cache entry
        dataset = load_as_trained(config, data_path, attempt)
        if list(dataset.image_size) == meta["image_size"]:
            break
    if dataset.classes != meta["classes"]:
        raise CnnlabError(f"the data at {dataset.source} has classes {dataset.classes}, "
                          f"but the run was trained on {meta['classes']}")
    return dataset


def run_test_logits(run: Run | str | Path, data_path: str | None = None, *, dataset: Dataset | None = None,
                    device: str = "auto") -> tuple[torch.Tensor, dict, Dataset]:
    """A run's final-weight logits on its test set (with the run's test-time augmentation), its
    metadata, and the data set they came from."""
    run = Run.of(run)
    dev = pick_device(device)
    model, meta = models.load_model(run, dev)
    dataset = dataset or run_dataset(run, meta, data_path)
    norm = Normalization.from_dict(meta["normalization"])
    dtype = pick_precision(meta.get("precision", "fp32"), dev)
    return predict_logits(model, dataset.x_test, norm, dev, dtype, tta=meta.get("tta", 0)), meta, dataset


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    """Loss, accuracy, balanced accuracy (the mean of the per-class recalls: what accuracy says when every
    class has as many images), top-5 accuracy (more than 5 classes), per-class scores, confusion matrix."""
    cm = confusion_matrix(y.numpy(), logits.argmax(1).numpy(), len(classes))
    top5 = {"test_top5_accuracy": top_k_accuracy(logits, y, 5)} if len(classes) > 5 else {}
    return {"test_loss": F.cross_entropy(logits, y).item() if len(y) else float("nan"),
            "test_accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "test_balanced_accuracy": balanced_accuracy(cm),
            **top5, "test_images": int(len(y)),
            **per_class_scores(cm, classes), "classes": classes, "confusion_matrix": cm.tolist()}


def top_k_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """The share of images whose true class is among the k most probable (NaN for no images)."""
    if not len(y):
        return float("nan")
    return float((logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]).any(1).float().mean())


def balanced_accuracy(cm: np.ndarray) -> float:
    """The mean recall over the classes that have images (NaN when none has)."""
    present = cm.sum(1) > 0
    return float((np.diag(cm)[present] / cm.sum(1)[present]).mean()) if present.any() else float("nan")


def save_metrics(run: Run, logits: torch.Tensor, y: torch.Tensor, classes: list[str], source: str,
                 picture: bool = True, calibrated: dict | None = None) -> dict:
    """Write metrics.json and the confusion matrix files (the PNG only with `picture`); return the metrics.
    `calibrated`: calibration.summary of these logits (what calibration changes), recorded when given."""
    metrics = {**metrics_from_logits(logits, y, classes), "data": source}
    if calibrated:
        metrics["calibration"] = calibrated
    run.write_metrics(metrics)
    write_confusion_matrix(run, np.array(metrics["confusion_matrix"]), classes, picture)
    return metrics


def evaluate_run(run: Run | str | Path, data_path: str | None = None, *, dataset: Dataset | None = None,
                 device: str = "auto", out: str | Path | None = None) -> dict:
    """Evaluate a run's final weights on a test set; write metrics.json and the confusion matrix files (in
    `results_folder(...)`) and return the metrics."""
    logits, meta, dataset = run_test_logits(run, data_path, dataset=dataset, device=device)
    folder = results_folder(run, data_path, out)
    folder.mkdir(parents=True, exist_ok=True)
    return save_metrics(Run(folder), logits, dataset.y_test, meta["classes"], dataset.source,
                        calibrated=calibration.summary(logits, dataset.y_test, meta["calibration"])
                        if meta.get("calibration") and len(dataset.y_test) else None)


def results_folder(run: Run | str | Path, data_path: str | None = None, out: str | Path | None = None) -> Path:
    """Where an evaluation's files go. On the run's own data: the run directory. On other data: `out`, by
    default RUN_DIR/evaluations/<data folder name>, so that what the run recorded never changes."""
    run = Run.of(run)
    if data_path is None:
        return run.path
    own = run.config()["data"].get("path")
    if isinstance(own, str) and Path(data_path).resolve() == Path(own).resolve():
        return run.path
    folder = Path(out) if out else run.file(Run.EVALUATIONS) / Path(data_path).resolve().name
    if Run.is_run(folder):
        raise CnnlabError(f"--out {folder} is a training run; choose another folder for the evaluation")
    return folder


def format_metrics(m: dict) -> str:
    """The tutorial's printout (test loss and accuracy) followed by a per-class table."""
    width = max(12, *(len(r["class"]) for r in m["per_class"]))
    extra = [f"Balanced accuracy: {m['test_balanced_accuracy']:.4f}"] if "test_balanced_accuracy" in m else []
    extra += [f"Top-5 accuracy: {m['test_top5_accuracy']:.4f}"] if "test_top5_accuracy" in m else []
    lines = [f"Test loss: {m['test_loss']:.4f}", f"Test accuracy: {m['test_accuracy']:.4f}", *extra, "",
             f"{'':<{width}}  precision  recall  f1-score  support"]
    lines += [f"{name:<{width}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>8.4f}  {r['support']:>7}"
              for name, r in report.score_rows(m)]
    if "calibration" in m:
        lines += ["", *calibration.words(m["calibration"])]
    return "\n".join(lines)
