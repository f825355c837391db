"""report.html: one self-contained page about a finished run, its pictures (plots.py) embedded as data URIs.

`write_report(run_dir, interp)` takes the run's Interpretation (analysis.py) and writes the page atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab import files
from cnnlab.run import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _png(fig: Figure, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _img(fig: Figure | bytes, alt: str) -> str:
    data = base64.b64encode(fig if isinstance(fig, bytes) else _png(fig)).decode()
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


def write_report(run: Run | str | Path, interp, out: str | Path | None = None, *, config: dict | None = None,
                 meta: dict | None = None) -> Path:
    """Write report.html for a run from its Interpretation (see cnnlab.analysis). Training hands on the
    configuration and model metadata it holds; otherwise they are read from the run."""
    run = Run.of(run)
    config = config or run.config()
    meta = meta or run.read_json(Run.META, "is it a finished training run?")
    per_class = [[name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
                 for name, r in score_rows(interp.classification_report())]
    confused = [[c.true, c.predicted, c.count] for c in interp.most_confused(10)]
    # drawn once (0.25 s of a 10-class matrix): the page shows the picture that confusion_matrix.png holds
    matrix = _png(interp.plot_confusion_matrix(), dpi=110)
    parts = [
        f"<h1>cnnlab report: {html.escape(run.path.name)}</h1>",
        '<div class="headline">' + "".join(f"<div>{html.escape(k)}<b>{html.escape(v)}</b></div>"
                                           for k, v in headline(config, meta, interp)) + "</div>",
        *([f'<p class="note">{html.escape(note)}</p>'] if (note := best_epoch_note(interp.history)) else []),
        "<h2>Training curves</h2>", _img(interp.plot_history(), "training curves") if interp.history else
        "<p>No history recorded.</p>",
        "<h2>Confusion matrix</h2>", _img(matrix, "confusion matrix"),
        _img(interp.plot_confusion_matrix(normalize="true"), "row-normalized confusion matrix"),
        "<h2>Per class</h2>", _table(["class", "precision", "recall", "F1", "support"], per_class),
        _img(interp.plot_per_class(), "per-class scores"),
        "<h2>Most confused pairs</h2>", _table(["true", "predicted", "count"], confused),
        *_trust(interp),
        "<h2>Top losses</h2>", _img(interp.plot_top_losses(16), "top losses"), _top_loss_table(interp),
        *_where_it_looked(run, interp),
        "<h2>Augmented training samples</h2>", _img(interp.plot_samples(), "augmented training samples"),
        *_leaderboard(run),
        "<details><summary>Configuration</summary>", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>",
        "</details>", "<h2>Where it was trained</h2>",
        _table(["", "value"], [[k, v] for k, v in config.get("environment", {}).items()]),
    ]
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>cnnlab report: '
            f"{html.escape(run.path.name)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    if out is None:  # the run's own report (training's, or `cnnlab report` of a --no-report run)
        files.write_bytes(run.file(Run.CONFUSION_PNG), matrix)
    out = Path(out) if out else run.file(Run.REPORT)
    files.write_text(out, page)
    return out


def _leaderboard(run: Run) -> list[str]:
    """A --budget run's search: each trial's candidate, settings, epochs, held-out accuracy and seconds."""
    if not run.file(Run.TRIALS).is_file():
        return []
    with open(run.file(Run.TRIALS), newline="") as f:
        rows = list(csv.reader(f))
    return ["<h2>The budget's search</h2><p>Trials on the held-out split (the test set was not used), best first; "
            "the final run trained the first one's candidate and settings (trials.csv).</p>",
            _table(rows[0], rows[1:])] if rows else []


def _trust(interp) -> list[str]:
    """Calibration and selective prediction: the reliability diagrams, accuracy against coverage, the threshold."""
    summary = interp.calibration()
    if summary is None:
        return ["<h2>Can you trust its answers?</h2>", "<p>This run was trained before cnnlab calibrated its "
                "probabilities; train it again to see its reliability diagram and a suggested --min-confidence.</p>"]
    before, after, sel = summary["before"], summary["after"], summary["selective"]
    where = ("the validation set" if summary["fitted_on"] == "validation" else
             "the test set, the only held-out images: the figures after calibration and the threshold are "
             "cross-fitted (each half of the test set scaled by the temperature fitted on the other half)")
    rows = [[name, f"{before[k]:.4f}", f"{after[k]:.4f}"] for name, k in
            (("expected calibration error (15 bins)", "ece"), ("negative log-likelihood", "nll"),
             ("Brier score", "brier"))]
    if sel["threshold"] is None:
        advice = f"No confidence threshold reaches {summary['target']:.0%} accuracy on the held-out images."
    else:
        advice = (f"--min-confidence {sel['threshold']:.3f} (or auto) answers {sel['coverage']:.1%} of the test "
                  f"images, {sel['accuracy']:.1%} of them right (target {summary['target']:.0%}); the rest are "
                  "\"unknown\". Chosen on " + ("the validation set." if summary["fitted_on"] == "validation" else
                                                 "the test set (cross-fitted)."))
    return ["<h2>Can you trust its answers?</h2>",
            f"<p>Probabilities are divided by a temperature of {summary['temperature']:.3f} before the softmax, "
            f"fitted on {html.escape(where)}; predict, serve and the ONNX export use it.</p>",
            _table(["", "before", "after"], rows), _img(interp.plot_reliability(), "reliability diagrams"),
            f"<p>{html.escape(advice)}</p>", _img(interp.plot_coverage(), "accuracy against coverage")]


def _where_it_looked(run: Run, interp) -> list[str]:
    """The top losses beside Grad-CAM heatmaps for the predicted and the true class (explain.py)."""
    from cnnlab import models
    from cnnlab.data.dataset import Normalization
    from cnnlab.errors import CnnlabError
    from cnnlab.evaluation.plots import image_grid

    if interp.images is None or not len(interp.y_true) or not run.file(Run.WEIGHTS).is_file():
        return []
    model, meta = models.load_model(run)
    try:
        pictures, titles = interp.heatmaps_of_top_losses(model, Normalization.from_dict(meta["normalization"]))
    except CnnlabError as e:  # a network without a convolution to map
        return [f"<p>No heatmaps: {html.escape(str(e))}.</p>"]
    grid = image_grid(pictures, titles, "Top losses: where the network looked (Grad-CAM)", columns=6, fontsize=12)
    return ["<h3>Where it looked</h3>", _img(grid, "Grad-CAM heatmaps of the top losses")]


def _top_loss_table(interp) -> str:
    """The pictured mistakes as a table: for image folders, the files to look at (or relabel)."""
    rows = interp.top_losses(16)
    has_files = bool(rows) and rows[0]["file"] is not None
    doubted = any(r["doubted"] for r in rows)  # `cnnlab data check --labels` ran on this data
    return _table((["file"] if has_files else ["test image"]) + ["true", "predicted", "probability", "loss"]
                  + (["label check"] if doubted else []),
                  [[r["file"] if has_files else r["index"], r["true"], r["predicted"], f"{r['probability']:.3f}",
                    f"{max(r['loss'], 0.0):.3f}"] + (["label doubted" if r["doubted"] else ""] if doubted else [])
                   for r in rows])


def headline(config: dict, meta: dict, interp) -> list[tuple[str, str]]:
    """The report's first facts: result, data, where and how it was trained."""
    data, env, history = config.get("data", {}), config.get("environment", {}), interp.history
    test_loss = max(float(interp.losses.mean()), 0.0) if len(interp.losses) else float("nan")  # never "-0.00"
    size = "x".join(map(str, meta.get("image_size", []))) + f", {meta.get('in_channels', 3)} channel" + (
        "s" if meta.get("in_channels", 3) != 1 else "")
    val = data.get("val_images")
    counts = (f"{data.get('train_images', 0):,} / {val:,} / {data.get('test_images', 0):,}" if val else
              f"{data.get('train_images', 0):,} / (the test set) / {data.get('test_images', 0):,}")
    rows = [("test accuracy", f"{interp.accuracy:.2%}"),
            ("balanced accuracy", f"{interp.balanced_accuracy():.2%}"),
            ("test loss", f"{test_loss:.4f}")]
    if len(interp.classes) > 5:
        rows.insert(1, ("top-5 accuracy", f"{interp.top_k_accuracy(5):.2%}"))
    if history:
        best = best_epoch(history, config.get("train", {}).get("monitor", "val_loss"))
        rows += [("best epoch (validation)", f"{best['epoch']}: {best['val_acc']:.2%}"),
                 ("final epoch (validation)", f"{history[-1]['epoch']}: {history[-1]['val_acc']:.2%}"),
                 ("weights kept", f"epoch {meta.get('epoch', history[-1]['epoch'])}")]
    return rows + [
        ("data", f"{Path(str(data.get('path', '?'))).name} ({data.get('format', '?')})"), ("image size", size),
        ("images train / validation / test", counts),
        *([("validation images", data["validation"])] if data.get("validation") else []),
        *[(f"training copies of {split} images", f"{n:,} with identical pixels: the score flatters the model; "
           "see `cnnlab data check`") for split, n in (data.get("exact_copies_of_held_out") or {}).items() if n],
        ("model", f"{meta['model']}, {meta['params']:,} parameters"),
        ("preset", config.get("preset", "")), *_starting_weights(config.get("train", {}), meta),
        ("device and precision", f"{env.get('device', '?')}, {env.get('precision', '?')}"
                                 + (f", {env['processes']} processes" if env.get("processes", 1) > 1 else "")),
        ("training time", f"{sum(h['seconds'] for h in history):.1f} s + validation "
                          f"{sum(h.get('val_seconds', 0.0) for h in history):.1f} s"),
        ("date", env.get("started", "")),
    ]


def _starting_weights(train: dict, meta: dict) -> list[tuple[str, str]]:
    """Where the weights came from, and how much of the network trained."""
    source = train.get("pretrained") or train.get("init_from")
    if not source:
        return []
    how = ("the head alone (--head-only)" if train.get("head_only") else
           f"the head for {train['freeze_epochs']} epoch(s), then everything" if train.get("freeze_epochs") else
           "everything")
    return [("started from", f"{Path(str(source)).name}; trained {how}")]


def best_epoch(history: list[dict], monitor: str = "val_loss") -> dict:
    """The history row of the best epoch: lowest val_loss, or highest val_acc (the first of equals)."""
    ok = [h for h in history if h[monitor] == h[monitor]] or history  # NaN losses are never best
    return min(ok, key=lambda h: h[monitor]) if monitor == "val_loss" else max(ok, key=lambda h: h[monitor])


def best_epoch_note(history: list[dict]) -> str | None:
    """A note when validation accuracy peaked before the last epoch."""
    if len(history) < 2:
        return None
    best, last = max(history, key=lambda h: h["val_acc"]), history[-1]
    if best["epoch"] == last["epoch"] or best["val_acc"] - last["val_acc"] < 0.005:
        return None
    return (f"Validation accuracy peaked at epoch {best['epoch']} ({best['val_acc']:.2%}) and ended at "
            f"{last['val_acc']:.2%}: the model over-fitted (or the validation set is small and noisy). Fewer "
            f"epochs, more augmentation or regularization would help; --early-stopping N stops by itself, and "
            f"--keep best keeps the best epoch's weights.")
