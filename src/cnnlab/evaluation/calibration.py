"""Whether to believe an answer: a temperature that calibrates the softmax, a confidence that the answer is right,
and the threshold below which the answer is "unknown".

A network trained with cross-entropy is usually over-confident: among test images it gives 0.95, fewer than
95% are right. Dividing the logits by one scalar T, fitted on held-out images by minimizing their negative
log-likelihood (Guo et al., 2017, "temperature scaling"), fixes most of that and changes no prediction.

    held-out logits  ->  fit              ->  T and the confidence's two numbers (model.json, the ONNX graph)
    test logits      ->  summary          ->  NLL, Brier score, ECE before and after; the reliability diagram;
                                              accuracy against coverage and the threshold for a target accuracy

The confidence that decides "unknown" is not the top probability but the chance that the answer is right as
the energy score tells it: sigmoid(a * E + b), E = T * logsumexp(logits / T) (Liu et al., 2020: an image of
no trained class gets low energy more often than a low top probability), with a and b fitted by logistic
regression on the held-out images (right or wrong). Measured with cat and truck held out of training
(benchmarks/trust.py): the energy told them from the 8 known classes with AUROC 0.707 against 0.664 for the
calibrated top probability (`quick`, CIFAR-10); the figures for `fast` are in benchmarks/results/trust.json.

The fit is a few LBFGS steps on log T (one scalar; a library would add a dependency for eight lines). Where the
only held-out images are the test set (the tutorial's recipe validates on it), the temperature in use is fitted
on the whole test set, and the figures "after" are cross-fitted: each half of the test set is scaled by the
temperature fitted on the other half, so no image is scored by a temperature that saw it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

BINS = 15  # equal-width confidence bins of the expected calibration error, as Guo et al. report it
TARGET = 0.95  # the accuracy of the accepted images the suggested --min-confidence aims at
LIMITS = (0.05, 20.0)  # a temperature outside these says the held-out set is degenerate (all right, or tiny)

FittedOn = Literal["validation", "test"]


def temperature_of(meta: dict) -> float:
    """The temperature model.json records (1.0 for runs trained before calibration existed)."""
    return float((meta.get("calibration") or {}).get("temperature", 1.0))


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The T > 0 that minimizes the cross-entropy of softmax(logits / T) on these labels (1.0 for no images)."""
    if len(y) == 0:
        return 1.0
    logits, y = logits.detach().double(), y.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss
    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, LIMITS[0]), LIMITS[1]) if t == t else 1.0  # (NaN: keep the logits as they are)


def energy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The negative free energy T * logsumexp(logits / T): high for images like the training images."""
    return temperature * torch.logsumexp(logits.float() / temperature, 1)


def fit_confidence(score: torch.Tensor, correct: torch.Tensor) -> tuple[float, float]:
    """(a, b) of the logistic regression P(right) = sigmoid(a * score + b) on held-out images."""
    score, correct = score.detach().double(), correct.double()
    if len(score) == 0 or correct.min() == correct.max():  # all right or all wrong: nothing to regress on
        return 0.0, float(torch.logit(correct.mean().clamp(0.01, 0.99))) if len(score) else 0.0
    spread = float(score.std()) if len(score) > 1 and float(score.std()) > 0 else 1.0
    params = torch.tensor([1.0 / spread, -float(score.mean()) / spread], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(params[0] * score + params[1], correct)
        loss.backward()
        return loss
    opt.step(closure)
    a, b = (float(v) for v in params.detach())
    return (a, b) if a == a and b == b else (0.0, 0.0)


def fit_parts(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """The temperature, then the confidence's regression on the energy at that temperature."""
    t = fit_temperature(logits, y)
    a, b = fit_confidence(energy(logits, t), logits.argmax(1) == y)
    return {"temperature": t, "score": "energy", "confidence": {"slope": a, "intercept": b}}


def confidence(logits: torch.Tensor, record: dict | None) -> torch.Tensor:
    """Per image, the chance its answer is right: from the energy where `record` (model.json's) has the
    regression, else (runs calibrated before it) the calibrated top probability."""
    t = temperature_of({"calibration": record})
    if record and record.get("confidence"):
        c = record["confidence"]
        return torch.sigmoid(c["slope"] * energy(logits, t) + c["intercept"])
    return (logits.float() / t).softmax(1).amax(1)


def cross_fitted(logits: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   list[dict]]:
    """Each half of the images (a seeded split) scaled, and given its confidence, by what was fitted on the
    other half: (scaled logits, confidences, the two halves' fits)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    halves = (order[: len(y) // 2], order[len(y) // 2:])
    scaled, conf, fits = logits.clone().float(), torch.zeros(len(y)), []
    for fit_on, apply_to in (halves, halves[::-1]):
        parts = fit_parts(logits[fit_on], y[fit_on])
        scaled[apply_to] = logits[apply_to].float() / parts["temperature"]
        conf[apply_to] = confidence(logits[apply_to], parts)
        fits.append(parts)
    return scaled, conf, fits


def scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """Negative log-likelihood, Brier score (squared error of the probability vector, summed over classes) and
    expected calibration error (BINS equal-width bins of the top probability) of these logits."""
    if len(y) == 0:
        return {"nll": float("nan"), "brier": float("nan"), "ece": float("nan")}
    probs = logits.float().softmax(1)
    onehot = F.one_hot(y.long(), probs.shape[1]).float()
    bins = reliability(probs, y)
    ece = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / len(y)
    return {"nll": F.cross_entropy(logits.float(), y.long()).item(),
            "brier": float(((probs - onehot) ** 2).sum(1).mean()), "ece": float(ece)}


def reliability(probs: torch.Tensor, y: torch.Tensor, bins: int = BINS) -> list[dict]:
    """Per non-empty confidence bin: its bounds, how many images, their mean top probability and accuracy."""
    conf, pred = probs.max(1)
    index = (conf * bins).long().clamp(max=bins - 1)  # a confidence of exactly 1.0 belongs to the last bin
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            right = (pred[mask] == y[mask]).float().mean()
            out.append({"low": b / bins, "high": (b + 1) / bins, "count": int(mask.sum()),
                        "confidence": float(conf[mask].mean()), "accuracy": float(right)})
    return out


def coverage_curve(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images sorted by confidence, highest first: (the k-th confidence, coverage k/n, accuracy of the top k)."""
    conf, order = confidence.float().sort(descending=True)
    hits = correct[order].float().cumsum(0)
    k = torch.arange(1, len(conf) + 1, dtype=torch.float32)
    return conf, k / max(len(conf), 1), hits / k


def threshold_for(confidence: torch.Tensor, correct: torch.Tensor, target: float = TARGET) -> float | None:
    """The lowest confidence threshold whose accepted images (confidence >= it) reach `target` accuracy; None
    when even the most confident image alone does not (or there are no images)."""
    conf, _, accuracy = coverage_curve(confidence, correct)
    group_end = torch.ones(len(conf), dtype=torch.bool)  # images of equal confidence are accepted together
    group_end[:-1] = conf[:-1] != conf[1:]
    reach = ((accuracy >= target) & group_end).nonzero()
    return float(conf[int(reach[-1])]) if len(reach) else None


def selective(confidence: torch.Tensor, correct: torch.Tensor, threshold: float | None) -> dict:
    """The share of images accepted at `threshold` and the accuracy on them."""
    if threshold is None or len(correct) == 0:
        return {"threshold": threshold, "coverage": 0.0, "accuracy": float("nan")}
    accepted = confidence >= threshold
    return {"threshold": threshold, "coverage": float(accepted.float().mean()),
            "accuracy": float(correct[accepted].float().mean()) if accepted.any() else float("nan")}


def fit(held_logits: torch.Tensor, held_y: torch.Tensor, fitted_on: FittedOn) -> dict:
    """What model.json records: the temperature and the confidence's regression fitted on the held-out logits,
    and the lowest confidence at which the accepted held-out images reach TARGET accuracy (cross-fitted where
    the held-out images are the test set): what `--min-confidence auto` takes."""
    parts = fit_parts(held_logits, held_y)
    conf = cross_fitted(held_logits, held_y)[1] if fitted_on == "test" else confidence(held_logits, parts)
    return {**parts, "fitted_on": fitted_on, "target": TARGET,
            "threshold": threshold_for(conf, held_logits.argmax(1) == held_y)}


def applied(test_logits: torch.Tensor, y_test: torch.Tensor, record: dict) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   list[float]]:
    """The test logits scaled by the temperature, their confidences, and the temperatures used: model.json's,
    or cross-fitted ones where it was fitted on the test set."""
    if record["fitted_on"] == "test":
        after, conf, fits = cross_fitted(test_logits, y_test)
        return after, conf, [f["temperature"] for f in fits]
    return test_logits.float() / record["temperature"], confidence(test_logits, record), [record["temperature"]]


def summary(test_logits: torch.Tensor, y_test: torch.Tensor, record: dict, done: tuple | None = None) -> dict:
    """What metrics.json records of calibration and selective prediction on the test set, for model.json's
    `record` (fit's). Where it was fitted on the test set, the figures after it are cross-fitted. `done`:
    `applied`'s result when the caller holds it already."""
    after, conf, temps = done or applied(test_logits, y_test, record)
    right = test_logits.argmax(1) == y_test
    return {**record, "fitted_temperatures": temps, "before": scores(test_logits, y_test),
            "after": scores(after, y_test), "reliability_before": reliability(test_logits.float().softmax(1), y_test),
            "reliability_after": reliability(after.softmax(1), y_test),
            "selective": selective(conf, right, record["threshold"])}


def words(summary: dict) -> list[str]:
    """The lines the end of a run and `cnnlab evaluate` print about calibration and the suggested threshold."""
    before, after, sel = summary["before"], summary["after"], summary["selective"]
    where = "the validation set" if summary["fitted_on"] == "validation" else "the test set, figures cross-fitted"
    lines = [f"Calibration: temperature {summary['temperature']:.3f} (fitted on {where}); ECE {before['ece']:.4f} -> "
             f"{after['ece']:.4f}, NLL {before['nll']:.4f} -> {after['nll']:.4f}"]
    if sel["threshold"] is None:
        lines.append(f"No confidence threshold reaches {summary['target']:.0%} accuracy on the held-out images")
    else:
        lines.append(f"--min-confidence {sel['threshold']:.3f} answers {sel['coverage']:.1%} of the test images, "
                     f"{sel['accuracy']:.1%} of them right (target {summary['target']:.0%}); the rest are 'unknown'")
    return lines
