"""Pictures of a trained classifier (matplotlib, no display needed). Each function returns the figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from . import files  # noqa: E402


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
    size = min(4 + 0.6 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), layout="constrained")
    im = ax.imshow(values, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set(title=title, xlabel="Predicted", ylabel="True")
    ticks = np.arange(k)
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    if k <= 20:  # beyond 20 classes the numbers would overlap
        threshold = values.max() / 2 if values.size else 0
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > threshold else "black")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG atomically and free the figure."""
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)
