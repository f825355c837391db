"""Pictures of a trained classifier (matplotlib, no display needed). Each function returns the figure.

Figures are made with matplotlib's object API (`Figure`, no pyplot and no GUI backend), imported on first
use: commands that draw nothing (predict, export, serve, evaluate without files) never pay for it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import files, runs

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _subplots(*grid: int, figsize: tuple[float, float], **kw):
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
    fig, ax = _subplots(figsize=(size, size * 0.85))
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
    fig, ax = _subplots(figsize=(width, width * mosaic.shape[0] / mosaic.shape[1] + 0.5))
    ax.axis("off")
    for i in range(n if images is not None else 0):
        r, k = divmod(i, columns)
        y, x = r * (h + gap_y) + gap_y, k * (w + gap_x)
        mosaic[y:y + h, x:x + w] = images[i].permute(1, 2, 0).cpu().numpy()
    ax.imshow(mosaic[:, :, 0] if c == 1 else mosaic, cmap="gray" if c == 1 else None, interpolation="nearest",
              vmin=0, vmax=255)
    for i, text in enumerate(titles):
        r, k = divmod(i, columns)
        ax.text(k * (w + gap_x) + w / 2, r * (h + gap_y) + gap_y - 0.5, _literal(text), fontsize=fontsize,
                ha="center", va="bottom")
    ax.set_title(_literal(title), fontsize=fontsize + 1)
    return fig


def plot_per_class(rows: list[dict]) -> Figure:
    """Grouped bars of precision, recall and F1 per class."""
    names = [_literal(r["class"]) for r in rows]
    x = np.arange(len(names))
    fig, ax = _subplots(figsize=(max(6, 0.5 * len(names) + 2), 4))
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
    fig, (loss_ax, acc_ax) = _subplots(1, 2, figsize=(10, 3.8))
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
    fig, ax = _subplots(figsize=(7, 4.2))
    for name, history in curves.items():
        ax.plot([h["epoch"] for h in history], [h["val_acc"] for h in history], "o-", label=name)
    ax.set(xlabel="Epoch", ylabel="Validation accuracy", title="Validation accuracy per epoch")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write a PNG atomically and free the figure."""
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


# ---------------------------------------------------------------------------------------------------
# The HTML report: one self-contained file, images embedded as data URIs


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(value) -> str:
    """A table cell: numbers right-aligned (in columns of digits), text left-aligned."""
    text = str(value)
    numeric = isinstance(value, int | float) or text.replace(".", "", 1).replace(",", "").lstrip("-").isdigit()
    return f'<td class="n">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .headline{display:flex;flex-wrap:wrap;gap:1em;margin:1em 0}
.headline div{background:#eef3fa;padding:.5em .9em;border-radius:6px;font-size:.9em;color:#456}
.headline b{display:block;font-size:1.35em;color:#123} .note{background:#fff4d6;padding:.6em 1em;border-radius:6px}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums} th{background:#f3f3f3} img{max-width:100%;display:block}
details{margin:1.5em 0} summary{font-size:1.3em;font-weight:bold;cursor:pointer}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}"""


def score_rows(scores: dict) -> list[tuple[str, dict]]:
    """(name, scores) per class, then the macro and weighted averages: the rows of a classification report."""
    return [(r["class"], r) for r in scores["per_class"]] + [("macro avg", scores["macro_avg"]),
                                                            ("weighted avg", scores["weighted_avg"])]


def write_report(run_dir: str | Path, interp, out: str | Path | None = None) -> Path:
    """Write report.html for a run from its Interpretation (see cnnlab.analysis)."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    meta = runs.read_json(run_dir / "model.json", "is it a finished training run?")
    per_class = [[name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
                 for name, r in score_rows(interp.classification_report())]
    confused = [[c.true, c.predicted, c.count] for c in interp.most_confused(10)]
    parts = [
        f"<h1>cnnlab report: {html.escape(run_dir.name)}</h1>",
        '<div class="headline">' + "".join(f"<div>{html.escape(k)}<b>{html.escape(v)}</b></div>"
                                           for k, v in headline(config, meta, interp)) + "</div>",
        *([f'<p class="note">{html.escape(note)}</p>'] if (note := best_epoch_note(interp.history)) else []),
        "<h2>Training curves</h2>", _img(interp.plot_history(), "training curves") if interp.history else
        "<p>No history recorded.</p>",
        "<h2>Confusion matrix</h2>", _img(interp.plot_confusion_matrix(), "confusion matrix"),
        _img(interp.plot_confusion_matrix(normalize="true"), "row-normalized confusion matrix"),
        "<h2>Per class</h2>", _table(["class", "precision", "recall", "F1", "support"], per_class),
        _img(interp.plot_per_class(), "per-class scores"),
        "<h2>Most confused pairs</h2>", _table(["true", "predicted", "count"], confused),
        "<h2>Top losses</h2>", _img(interp.plot_top_losses(16), "top losses"), _top_loss_table(interp),
        "<h2>Augmented training samples</h2>", _img(interp.plot_samples(), "augmented training samples"),
        "<details><summary>Configuration</summary>", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>",
        "</details>", "<h2>Where it was trained</h2>",
        _table(["", "value"], [[k, v] for k, v in config.get("environment", {}).items()]),
    ]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>cnnlab report: '
            f"{html.escape(run_dir.name)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    if out is None and not (run_dir / "confusion_matrix.png").exists():  # a --no-report run gets it now
        save_figure(interp.plot_confusion_matrix(), run_dir / "confusion_matrix.png")
    out = Path(out) if out else run_dir / "report.html"
    files.write_text(out, page)
    return out


def _top_loss_table(interp) -> str:
    """The pictured mistakes as a table: for image folders, the files to look at (or relabel)."""
    rows = interp.top_losses(16)
    has_files = bool(rows) and rows[0]["file"] is not None
    return _table((["file"] if has_files else ["test image"]) + ["true", "predicted", "probability", "loss"],
                  [[r["file"] if has_files else r["index"], r["true"], r["predicted"], f"{r['probability']:.3f}",
                    f"{max(r['loss'], 0.0):.3f}"] for r in rows])


def headline(config: dict, meta: dict, interp) -> list[tuple[str, str]]:
    """The report's first facts: result, data, where and how it was trained."""
    data, env, history = config.get("data", {}), config.get("environment", {}), interp.history
    test_loss = max(float(interp.losses.mean()), 0.0) if len(interp.losses) else float("nan")  # never "-0.00"
    size = "x".join(map(str, meta.get("image_size", []))) + f", {meta.get('in_channels', 3)} channel" + (
        "s" if meta.get("in_channels", 3) != 1 else "")
    val = data.get("val_images")
    counts = (f"{data.get('train_images', 0):,} / {val:,} / {data.get('test_images', 0):,}" if val else
              f"{data.get('train_images', 0):,} / (the test set) / {data.get('test_images', 0):,}")
    rows = [("test accuracy", f"{interp.accuracy:.2%}"), ("test loss", f"{test_loss:.4f}")]
    if history:
        best = max(history, key=lambda h: h["val_acc"])
        rows += [("best epoch (validation)", f"{best['epoch']}: {best['val_acc']:.2%}"),
                 ("final epoch (validation)", f"{history[-1]['epoch']}: {history[-1]['val_acc']:.2%}")]
    return rows + [
        ("data", f"{Path(str(data.get('path', '?'))).name} ({data.get('format', '?')})"), ("image size", size),
        ("images train / validation / test", counts), ("model", f"{meta['model']}, {meta['params']:,} parameters"),
        ("preset", config.get("preset", "")),
        ("device and precision", f"{env.get('device', '?')}, {env.get('precision', '?')}"
                                 + (f", {env['processes']} processes" if env.get("processes", 1) > 1 else "")),
        ("training time", f"{sum(h['seconds'] for h in history):.1f} s + validation "
                          f"{sum(h.get('val_seconds', 0.0) for h in history):.1f} s"),
        ("date", env.get("started", "")),
    ]


def best_epoch_note(history: list[dict]) -> str | None:
    """A note when validation accuracy peaked before the last epoch (the final weights are the last epoch's)."""
    if len(history) < 2:
        return None
    best, last = max(history, key=lambda h: h["val_acc"]), history[-1]
    if best["epoch"] == last["epoch"] or best["val_acc"] - last["val_acc"] < 0.005:
        return None
    return (f"Validation accuracy peaked at epoch {best['epoch']} ({best['val_acc']:.2%}) and ended at "
            f"{last['val_acc']:.2%}: the model over-fitted (or the validation set is small and noisy). The final "
            f"weights are the last epoch's; fewer epochs, more augmentation or regularization would help.")
