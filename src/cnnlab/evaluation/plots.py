"""Pictures of a trained classifier (matplotlib, no display needed). Each function returns the figure.

Figures are made with matplotlib's object API (`Figure`, no pyplot and no GUI backend), imported on first
use: commands that draw nothing (predict, export, serve, evaluate without files) never pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnlab import files

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def subplots(*grid: int, figsize: tuple[float, float], **kw):
    """A figure and its axes, as pyplot.subplots gives them, without pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def _literal(text: str) -> str:
    """Text that matplotlib shows as written: a class named `a$b$` is not a formula (and `$\\x$` no error)."""
    return str(text).replace("$", r"\$")


def _integer_ticks(ax, epochs: list[int] | None = None) -> None:
    """Whole epochs on the x axis: each one when there are few (a 1-epoch run shows "1", not 0.96 ... 1.04)."""
    from matplotlib.ticker import MaxNLocator

    if epochs is not None and len(epochs) <= 12:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], normalize: str | None = None,
                          title: str = "Confusion matrix") -> Figure:
    """Heatmap with true classes down, predicted across, and the count (or rate) in every cell."""
    cm = np.asarray(cm)
    values = cm.astype(float)
    if normalize == "true":
        values = values / np.maximum(values.sum(1, keepdims=True), 1)
    elif normalize == "pred":
        values = values / np.maximum(values.sum(0, keepdims=True), 1)
    k = len(classes)
    size = min(5 + 0.75 * k, 24)  # 10 classes: 12.5 in, about 1,100 px in the report (one matrix per row)
    fig, ax = subplots(figsize=(size, size * 0.85))
    im = ax.imshow(values, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=15)
    ax.set_xlabel("Predicted", fontsize=13)
    ax.set_ylabel("True", fontsize=13)
    step = max(1, int(np.ceil(k / 20)))  # at most about 20 labels per axis stay readable
    ticks = np.arange(0, k, step)
    ax.set_xticks(ticks, [_literal(classes[i]) for i in ticks], rotation=45, ha="right", fontsize=12)
    ax.set_yticks(ticks, [_literal(classes[i]) for i in ticks], fontsize=12)
    if k <= 20:  # beyond 20 classes the numbers would overlap
        threshold = values.max() / 2 if values.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=13 if k <= 12 else 9,
                        color="white" if values[i, j] > threshold else "black")
    return fig


CHAR_WIDTH = 0.62  # DejaVu Sans' widest common glyphs (digits, capitals) in ems, for captions that must fit


def fit_lines(text: str, chars: int) -> str:
    """Each line of `text` at most `chars` characters, shortened in the middle (a file's start and extension
    both stay readable)."""
    chars = max(chars, 5)
    return "\n".join(line if len(line) <= chars else line[:(chars - 1) // 2] + "…" + line[-(chars // 2):]
                     for line in text.split("\n"))


def image_grid(images, titles: list[str], title: str, columns: int = 8, fontsize: float = 11) -> Figure:
    """uint8 (N, C, H, W) images in a grid, each with its title (a text-only grid when images is None).

    One mosaic in one axes with the titles written over its gaps: 40 separate small axes took 0.3 s to draw.
    """
    n = len(titles)
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    h, w, c = (images.shape[2], images.shape[3], images.shape[1]) if images is not None and n else (4, 4, 1)
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    gap_x, gap_y = max(1, w // 8), max(2, h * lines // 5)  # the space above each image holds its title
    mosaic = np.full((rows * (h + gap_y), columns * (w + gap_x), c), 255, np.uint8)
    width = max(1.9 * columns, 10)
    fig, ax = subplots(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + 0.5))
    ax.axis("off")
    for i in range(n if images is not None else 0):
        r, k = divmod(i, columns)
        y, x = r * (h + gap_y) + gap_y, k * (w + gap_x)
        mosaic[y:y + h, x:x + w] = images[i].permute(1, 2, 0).cpu().numpy()
    ax.imshow(mosaic[:, :, 0] if c == 1 else mosaic, cmap="gray" if c == 1 else None, interpolation="nearest",
              vmin=0, vmax=255)
    ax.apply_aspect()  # the axes' drawn width (an image keeps its aspect): each cell's share, in points
    cell = ax.get_position().width * fig.get_figwidth() / columns * 72
    fits = int(cell / (fontsize * CHAR_WIDTH))  # characters of a caption line that fit a cell
    for i, text in enumerate(titles):
        r, k = divmod(i, columns)
        ax.text(k * (w + gap_x) + w / 2, r * (h + gap_y) + gap_y - 0.5, _literal(fit_lines(text, fits)),
                fontsize=fontsize, ha="center", va="bottom")
    ax.set_title(_literal(title), fontsize=fontsize + 1)
    return fig


def plot_per_class(rows: list[dict]) -> Figure:
    """Grouped bars of precision, recall and F1 per class."""
    names = [_literal(r["class"]) for r in rows]
    x = np.arange(len(names))
    fig, ax = subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
    for offset, key in zip((-0.27, 0, 0.27), ("precision", "recall", "f1"), strict=True):
        ax.bar(x + offset, [r[key] for r in rows], width=0.27, label=key)
    step = max(1, int(np.ceil(len(names) / 30)))
    ax.set_xticks(x[::step], names[::step], rotation=45, ha="right")
    ax.set(ylim=(0, 1.15), yticks=np.linspace(0, 1, 6), xlabel="Class", ylabel="Score",
           title="Per-class precision, recall and F1")
    ax.legend(loc="upper center", ncol=3, frameon=False)  # in the band above 1.0, never over a bar
    return fig


def plot_history(history: list[dict]) -> Figure:
    """Loss and accuracy per epoch, training against validation."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="validation")
        ax.set(xlabel="Epoch", ylabel=label, title=f"{label} per epoch")
        _integer_ticks(ax, epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_val_accuracy(curves: dict[str, list[dict]]) -> Figure:
    """Validation accuracy per epoch of several runs, overlaid."""
    fig, ax = subplots(figsize=(7, 4.2))
    for name, history in curves.items():
        ax.plot([h["epoch"] for h in history], [h["val_acc"] for h in history], "o-", label=name)
    ax.set(xlabel="Epoch", ylabel="Validation accuracy", title="Validation accuracy per epoch")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_reliability(summary: dict) -> Figure:
    """Reliability diagrams before and after the temperature: per confidence bin, the accuracy of its images
    against their mean confidence (on the diagonal: calibrated), each bar as wide as its bin; the bins' image
    counts as a thin grey histogram below."""
    fig, axes = subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, key, name in ((axes[0], "before", "Before calibration"), (axes[1], "after", "After calibration")):
        bins = summary[f"reliability_{key}"]
        total = max(sum(b["count"] for b in bins), 1)
        ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=[b["high"] - b["low"] for b in bins],
               align="edge", edgecolor="#1f4e79", color="#6fa8dc", label="accuracy")
        ax.bar([b["low"] for b in bins], [b["count"] / total for b in bins], width=[b["high"] - b["low"] for b in bins],
               align="edge", color="#999", alpha=0.5, label="share of images")
        ax.plot([0, 1], [0, 1], "--", color="#c00", label="calibrated")
        ece = summary[key]["ece"]
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Confidence (top probability)", title=f"{name}: ECE {ece:.3f}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return fig


def plot_coverage(confidence: np.ndarray, correct: np.ndarray, threshold: float | None, target: float) -> Figure:
    """Selective prediction: the accuracy of the images answered against the share answered, answering the most
    confident first (confidence: the chance the answer is right, calibration.py); the suggested threshold
    marked."""
    order = np.argsort(-confidence, kind="stable")
    k = np.arange(1, len(order) + 1)
    accuracy = np.cumsum(correct[order]) / k
    fig, ax = subplots(figsize=(6.5, 4.2))
    ax.plot(k / max(len(k), 1), accuracy, color="#1f4e79")
    ax.axhline(target, ls="--", color="#c00", lw=1, label=f"target {target:.0%}")
    if threshold is not None:
        share = float((confidence >= threshold).mean())
        ax.axvline(share, ls=":", color="#444", lw=1, label=f"--min-confidence {threshold:.3f}: {share:.1%} answered")
    ax.set(xlim=(0, 1), xlabel="Share of test images answered (the rest: unknown)", ylabel="Accuracy of those answered",
           title="Accuracy against coverage")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG atomically and free the figure."""
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)
