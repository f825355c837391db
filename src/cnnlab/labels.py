"""Likely label errors (`cnnlab data check --labels`): out-of-fold predictions ranked by confident learning.

The training images are split into K stratified folds; K models of the `quick` recipe each train on K-1 folds
and predict the fold they never saw, so every training image gets a prediction from a model that did not learn
its label. Each model also predicts the validation and test images (which none trained on), averaged over the
K models. cleanlab's confident learning (Northcutt et al., 2021: `cleanlab.filter.find_label_issues`, ranked by
self-confidence) then names the images whose given label their prediction doubts most, with the label it
suggests. cleanlab is used as it is: it is the reference implementation, and its per-class thresholds are what
keeps a hard class (CIFAR's cats) from filling the list.

What it finds is recorded beside the decoded data (cache entry, `label_suspects.json`), where a run's report
finds it to mark its top losses. It sits above the training layer because it trains; data/check.py holds the
checks that need no model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cnnlab import logs, presets
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.data import cache, dataset
from cnnlab.data.check import Images
from cnnlab.errors import CnnlabError
from cnnlab.evaluation import evaluate
from cnnlab.models import load_model
from cnnlab.run import Run
from cnnlab.training.lifecycle import train

log = logging.getLogger(__name__)


def out_of_fold_probabilities(ds: dataset.Dataset, folds: int = 5, seed: int = 0, preset: str = "quick",
                              epochs: int | None = None) -> dict[str, np.ndarray]:
    """Per split ("train", and "val"/"test" where present), (N, classes) probabilities from models that never
    trained on those images: each training fold from the model of the other folds, held-out images averaged."""
    if not 2 <= folds <= 20:
        raise CnnlabError(f"--folds must be between 2 and 20, got {folds}")
    y = ds.y_train.numpy()
    if len(y) == 0 or np.bincount(y, minlength=ds.num_classes).min() < folds:
        raise CnnlabError(f"some class has fewer than {folds} training images: use fewer --folds")
    fold = _fold_of(y, folds, seed, ds.num_classes)
    probs = {"train": np.zeros((len(y), ds.num_classes), np.float32)}
    held = {s: x for s, x in (("val", ds.x_val), ("test", ds.x_test)) if x is not None and len(x)}
    probs.update({s: np.zeros((len(x), ds.num_classes), np.float32) for s, x in held.items()})
    with tempfile.TemporaryDirectory(prefix="cnnlab-labels-") as tmp:
        for k in range(folds):
            fit_on, own = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
            cfg = recipe(presets.get(preset), len(fit_on), seed, epochs)
            part = replace(ds, x_train=ds.x_train[fit_on], y_train=ds.y_train[fit_on],
                           x_test=ds.x_train[own], y_test=ds.y_train[own], x_val=None, y_val=None, test_files=())
            with logs.captured():  # one line per model, not a training log each
                run = Run(train(cfg, DataConfig(path=ds.source), out=Path(tmp) / f"fold-{k}", dataset=part,
                                with_report=False))
            predict = _predictor(run)
            probs["train"][own] = predict(part.x_test)
            agree = float((probs["train"][own].argmax(1) == y[own]).mean())
            log.info(f"label check: model {k + 1} of {folds} ({cfg.model}, {cfg.epochs} epochs of batch "
                     f"{cfg.batch_size} on {len(fit_on):,} images) agrees with {agree:.1%} of the labels it never saw")
            for s, x in held.items():
                probs[s] += predict(x) / folds
    return probs


MIN_STEPS = 150  # steps each fold's model takes at least: the quick recipe's one epoch of 1,024-image batches is
MAX_EPOCHS = 10  # 47 steps on CIFAR-10 but 8 on a 10,000-image set, too few to predict anything well


def recipe(cfg: TrainConfig, n: int, seed: int, epochs: int | None = None) -> TrainConfig:
    """The preset sized for `n` training images: batches of at most a sixteenth of them, and at least MIN_STEPS
    steps (at most MAX_EPOCHS epochs), unless `epochs` is given."""
    batch = min(cfg.batch_size, max(16, n // 16))
    batch += n % batch == 1  # no last batch of one image: BatchNorm cannot normalize it
    steps = max(1, n // batch)
    return replace(cfg, seed=seed, batch_size=batch,
                   epochs=epochs or min(MAX_EPOCHS, max(cfg.epochs, -(-MIN_STEPS // steps))))


def _fold_of(y: np.ndarray, folds: int, seed: int, num_classes: int) -> np.ndarray:
    """Each image's fold, stratified: every class spread evenly over the folds, by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(y == c)
        fold[rng.permutation(members)] = np.arange(len(members)) % folds
    return fold


def _predictor(run: Run):
    model, meta = load_model(run, torch.device("cpu"))
    norm = dataset.Normalization.from_dict(meta["normalization"])

    def predict(x: torch.Tensor) -> np.ndarray:
        return evaluate.predict_logits(model, x, norm, torch.device("cpu"), batch_size=500).softmax(1).numpy()
    return predict


def rank(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images cleanlab finds mislabelled, most doubted first, and every image's label quality (0 to 1)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return np.asarray(flagged, np.int64), get_label_quality_scores(labels, probs)


def suspects(entry: cache.Entry, ds: dataset.Dataset, folds: int = 5, seed: int = 0,
             epochs: int | None = None) -> list[dict]:
    """Likely label errors of every split, most doubted first: the image (as data/check.py names it), the label
    it has, the label the models suggest, and its label quality. Recorded beside the decoded data."""
    probs = out_of_fold_probabilities(ds, folds, seed, epochs=epochs)
    im = Images(entry)
    offsets = dict(zip(im.splits, np.cumsum([0] + [len(entry.labels(s)) for s in im.splits]), strict=False))
    out = []
    for split, p in probs.items():
        labels = entry.labels(split)
        flagged, quality = rank(labels, p)
        for r in flagged:
            out.append({**im.ref(int(offsets[split] + r)), "suggested": ds.classes[int(p[r].argmax())],
                        "quality": round(float(quality[r]), 4)})
    out.sort(key=lambda s: s["quality"])
    _record(entry, out)
    return out


def _record(entry: cache.Entry, found: list[dict]) -> None:
    rows = {s: sorted(f["index"] for f in found if f["split"] == s) for s in entry.splits}
    tmp = entry.folder / f".{cache.SUSPECTS}.tmp"
    try:
        tmp.write_text(json.dumps(rows))
        tmp.replace(entry.folder / cache.SUSPECTS)
    except OSError:
        pass  # a read-only cache: the report simply marks nothing
