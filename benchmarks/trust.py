"""Can its answers be trusted: calibration, selective prediction, open-set detection and Grad-CAM's corner test.

    .venv/bin/python benchmarks/trust.py [--presets quick fast] [--corner-images 1500]

For each preset, on CIFAR-10 (the JPEG copy) with a tenth of the training images held out for validation:
1. Calibration: the run's own record (metrics.json) of the expected calibration error (15 bins) and negative
   log-likelihood on the test set before and after the temperature fitted on the validation set, and the share
   of test images answered at the threshold chosen on the validation set for 95% accuracy (with that accuracy).
2. Open set: the same recipe trained on 8 classes (cat and truck held out of training and validation); the
   test images of the 8 are "known", those of the 2 "unknown". AUROC of telling them apart by each score:
   the calibrated maximum probability, the maximum logit, and the negative energy T * logsumexp(logits / T)
   (Liu et al., 2020), and the product's confidence (a logistic regression on the energy). The product decides
   by the score that wins here. Beside it, the AUROC of telling right answers from wrong ones on the known
   classes' test images, the score's other job.
3. Grad-CAM's corner test: images of grey noise with one of three patterns pasted in a random corner; `quick`
   trained on them; the share of test images whose map for the true class peaks in the pattern's quadrant.
Writes benchmarks/results/trust.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cnnlab import data, models, presets, training
from cnnlab.config import DataConfig, override
from cnnlab.data.dataset import Dataset, Normalization
from cnnlab.evaluation import calibration, evaluate, explain
from common import DATA, ROOT, cpu_class, machine, save

HELD_OUT = ("cat", "truck")


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(a known image scores above an unknown one), ties counted half (the Mann-Whitney statistic)."""
    scores = np.concatenate([known, unknown])
    ranks = scores.argsort(kind="stable").argsort(kind="stable").astype(float) + 1
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[: len(known)].sum() - len(known) * (len(known) + 1) / 2) / (len(known) * len(unknown)))


def calibration_figures(preset: str, out: Path) -> dict:
    t0 = time.perf_counter()
    run = training.train(presets.get(preset), DataConfig(path=str(DATA), val_split=0.1), preset=preset,
                         out=out / f"{preset}-calibration", with_report=False)
    m = json.loads((run / "metrics.json").read_text())
    c = m["calibration"]
    return {"test_accuracy": m["test_accuracy"], "temperature": round(c["temperature"], 4),
            "ece_before": round(c["before"]["ece"], 4), "ece_after": round(c["after"]["ece"], 4),
            "nll_before": round(c["before"]["nll"], 4), "nll_after": round(c["after"]["nll"], 4),
            "brier_before": round(c["before"]["brier"], 4), "brier_after": round(c["after"]["brier"], 4),
            "min_confidence_for_95": c["selective"]["threshold"],
            "accepted_at_95": round(c["selective"]["coverage"], 4),
            "accuracy_of_accepted": round(c["selective"]["accuracy"], 4), "seconds": round(time.perf_counter() - t0)}


def open_set_figures(preset: str, out: Path) -> dict:
    ds = data.load(DataConfig(path=str(DATA)))
    keep = [i for i, c in enumerate(ds.classes) if c not in HELD_OUT]
    remap = torch.full((len(ds.classes),), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    known_train = remap[ds.y_train] >= 0
    known_test = remap[ds.y_test] >= 0
    eight = replace(ds, x_train=ds.x_train[known_train], y_train=remap[ds.y_train[known_train]],
                    x_test=ds.x_test[known_test], y_test=remap[ds.y_test[known_test]],
                    classes=[ds.classes[i] for i in keep]).hold_out(0.1, seed=0)
    run = training.train(presets.get(preset), DataConfig(path=str(DATA), val_split=0.1), preset=preset,
                         out=out / f"{preset}-open-set", dataset=eight, with_report=False)
    model, meta = models.load_model(run)
    norm, t = Normalization.from_dict(meta["normalization"]), calibration.temperature_of(meta)
    logits = evaluate.predict_logits(model, ds.x_test, norm, torch.device("cpu"), tta=meta["tta"])
    scores = {"max_probability": (logits / t).softmax(1).amax(1), "max_logit": logits.amax(1),
              "energy": t * torch.logsumexp(logits / t, 1)}
    scores["confidence"] = calibration.confidence(logits, meta["calibration"])  # what the product decides by
    known = known_test.numpy()
    right = (logits.argmax(1) == remap[ds.y_test]).numpy()[known]
    return {"held_out_classes": list(HELD_OUT),
            "known_accuracy": json.loads((run / "metrics.json").read_text())["test_accuracy"],
            "auroc": {name: round(auroc(s.numpy()[known], s.numpy()[~known]), 4) for name, s in scores.items()},
            # the other job of the score: telling right answers from wrong ones among the known classes' images
            "auroc_right_vs_wrong": {name: round(auroc(s.numpy()[known][right], s.numpy()[known][~right]), 4)
                                     for name, s in scores.items()}}


def corner_figures(n: int, out: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))  # the corner images are tests/test_trust.py's, not a copy of them
    from test_trust import corner_images

    x, y, _ = corner_images(n, seed=0)
    x_test, y_test, corner = corner_images(300, seed=1)
    ds = Dataset(x_train=x, y_train=y, x_test=x_test, y_test=y_test, classes=["checker", "ring", "cross"],
                      format="image-folder", source="corner patterns", split="generated")
    run = training.train(override(presets.get("quick"), epochs=4, tta=0), dataset=ds, out=out / "corner",
                         with_report=False)
    model, meta = models.load_model(run)
    maps = explain.heatmaps(model, x_test, Normalization.from_dict(meta["normalization"]), y_test)
    peak = maps.flatten(1).argmax(1)
    found = (peak // 32 >= 16).long() * 2 + (peak % 32 >= 16).long()
    return {"train_images": n, "test_images": 300,
            "test_accuracy": json.loads((run / "metrics.json").read_text())["test_accuracy"],
            "hit_rate": round(float((found == corner).float().mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["quick", "fast"])
    parser.add_argument("--corner-images", type=int, default=1500)
    args = parser.parse_args()
    result = {"machine": machine(), "cpu_class": cpu_class(), "data": "CIFAR-10 (JPEG copy), 10% of train held out",
              "presets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for preset in args.presets:
            result["presets"][preset] = {**calibration_figures(preset, out), "open_set": open_set_figures(preset, out)}
            print(preset, json.dumps(result["presets"][preset]))
        result["corner"] = corner_figures(args.corner_images, out)
        print("corner", json.dumps(result["corner"]))
    save("trust", result)


if __name__ == "__main__":
    main()
