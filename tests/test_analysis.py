"""The interpretation verbs against hand-computed values, the plots, `cnnlab runs`, and the HTML report."""

from __future__ import annotations

import math
import re

import pytest
import torch

from cnnlab import cli, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.evaluation.analysis import Interpretation
from conftest import ARTIFACTS, launch_chromium, needs_chromium, write_image_folder

CLASSES = ["cat", "dog", "eel"]
Y_TRUE = torch.tensor([0, 0, 1, 1, 2, 2, 2])
# logits chosen so the predictions are [0, 1, 1, 1, 2, 0, 2] with known probabilities
LOGITS = torch.tensor([[2.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0], [0, 2.0, 0], [0, 0, 4.0], [5.0, 0, 0], [0, 0, 1.0]])


@pytest.fixture
def interp():
    images = torch.arange(7 * 3 * 4 * 4, dtype=torch.uint8).view(7, 3, 4, 4)
    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.2 / e,
                "val_acc": 0.4 + e / 10, "seconds": 1.0, "images_per_s": 10.0} for e in (1, 2, 3)]
    return Interpretation(CLASSES, Y_TRUE, LOGITS, images, history, images, torch.tensor([0, 1, 2, 0, 1, 2, 0]))


def test_confusion_matrix_counts_and_normalizations(interp):
    assert interp.confusion_matrix().tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    rows = interp.confusion_matrix("true")
    assert rows[2].tolist() == pytest.approx([1 / 3, 0, 2 / 3])
    cols = interp.confusion_matrix("pred")
    assert cols[:, 0].tolist() == pytest.approx([0.5, 0, 0.5])
    assert interp.accuracy == pytest.approx(5 / 7)


def test_classification_report(interp):
    report = interp.classification_report()
    assert [r["f1"] for r in report["per_class"]] == pytest.approx([0.5, 0.8, 0.8])
    assert report["macro_avg"]["f1"] == pytest.approx(0.7)


def test_most_confused_pairs_in_order(interp):
    pairs = interp.most_confused(5)
    assert [(p.true, p.predicted, p.count) for p in pairs] == [("cat", "dog", 1), ("eel", "cat", 1)]
    assert interp.most_confused(1)[0].true == "cat"


def test_top_losses_ordering_and_values(interp):
    top = interp.top_losses(3)
    # the worst is image 5 (an eel called cat with logit 5): loss = -log softmax([5, 0, 0])[2]
    assert [t["index"] for t in top] == [5, 1, 6]
    assert top[0] == {"index": 5, "file": None, "true": "eel", "predicted": "cat",
                      "probability": pytest.approx(math.exp(5) / (math.exp(5) + 2)),
                      "loss": pytest.approx(math.log(math.exp(5) + 2)), "doubted": False}
    losses = [t["loss"] for t in interp.top_losses(7)]
    assert losses == sorted(losses, reverse=True)


def test_every_plot_returns_a_labelled_figure(interp, tmp_path):
    cm = interp.plot_confusion_matrix()
    assert (cm.axes[0].get_xlabel(), cm.axes[0].get_ylabel()) == ("Predicted", "True")
    assert "row-normalized" in interp.plot_confusion_matrix(normalize="true").axes[0].get_title()
    per_class = interp.plot_per_class().axes[0]
    assert (per_class.get_xlabel(), per_class.get_ylabel()) == ("Class", "Score")
    loss_ax, acc_ax = interp.plot_history().axes
    assert (loss_ax.get_xlabel(), loss_ax.get_ylabel(), acc_ax.get_ylabel()) == ("Epoch", "Loss", "Accuracy")
    assert [line.get_label() for line in acc_ax.get_lines()] == ["train", "validation"]
    top = interp.plot_top_losses(4)  # one mosaic, each image's title written above it, in order
    titles = [t.get_text() for t in top.axes[0].texts]
    assert titles[0].startswith("eel / cat\n") and len(titles) == 4
    assert top.axes[0].images[0].get_array().shape[:2] == (4 + 2, 4 * (4 + 1))  # 4x4 images in a row, with gaps
    samples = interp.plot_samples(per_class=2)
    assert sorted(t.get_text() for t in samples.axes[0].texts) == ["cat", "cat", "dog", "dog", "eel", "eel"]
    cm.savefig(tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_hundred_classes_stay_readable():
    k = 100
    y = torch.arange(k).repeat(3)
    logits = torch.nn.functional.one_hot((y + (y % 7 == 0).long()) % k, k).float()
    interp = Interpretation([f"class_{i:03d}" for i in range(k)], y, logits)
    ax = interp.plot_confusion_matrix().axes[0]
    assert len(ax.texts) == 0  # no numbers in 10,000 cells
    assert 5 <= len(ax.get_xticklabels()) <= 20 and 5 <= len(ax.get_yticklabels()) <= 20
    assert len(interp.plot_per_class().axes[0].get_xticklabels()) <= 30


@pytest.mark.parametrize("name", ["cat/0005.jpg", "holidays_2023/IMG_20230715_142233_HDR.jpg",
                                  "a_very_long_folder_name_of_photos/x.png"])
def test_top_loss_captions_never_overlap(name):
    """Captions of files and classes of any length stay inside their cell of the grid."""
    k, n = 3, 12
    y = torch.arange(n) % k
    logits = torch.nn.functional.one_hot((y + 1) % k, k).float()  # every image wrong
    classes = ["a_long_class_name_here", "another_quite_long_one", "short"]
    files = [name.replace(".", f"_{i}.") for i in range(n)]
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    fig = Interpretation(classes, y, logits, images=images, files=files).plot_top_losses(12)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in fig.axes[0].texts]
    assert len(boxes) == 12
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1:]), [t.get_text() for t in fig.axes[0].texts]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("imgs") / "set", per_class=20, size=(16, 16))
    out = tmp_path_factory.mktemp("runs") / "runs" / "first"
    training.train(TrainConfig(epochs=2, batch_size=16, augment="seed"), DataConfig(path=str(root)), preset="seed",
                out=out)
    return root, out


def test_training_writes_a_self_contained_report(finished_run):
    _, run = finished_run
    page = (run / "report.html").read_text()
    sections = ["<h2>Training curves", "<h2>Confusion matrix", "<h2>Per class", "<h2>Most confused pairs",
                "<h2>Can you trust its answers?", "<h2>Top losses", "<h3>Where it looked",
                "<h2>Augmented training samples", "<summary>Configuration", "<h2>Where it was trained"]
    positions = [page.index(s) for s in sections]
    assert positions == sorted(positions)  # in the order the issue lists
    assert "test accuracy" in page and "parameters" in page
    # curves, two confusion matrices, per class, reliability, coverage, top losses, their heatmaps, samples
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', page)) == 9
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network


def test_runs_table_and_compare(finished_run, tmp_path, capsys):
    root, first = finished_run
    second = first.parent / "second"
    if not second.exists():
        training.train(TrainConfig(epochs=3, batch_size=16), DataConfig(path=str(root)), preset="seed", out=second,
                       with_report=False)
    capsys.readouterr()  # what training said
    assert cli.main(["runs", str(first.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "preset", "model"]
    assert [ln.split()[0] for ln in lines[1:]] == ["first", "second"]
    assert lines[2].split()[3] == "3/3"
    png = tmp_path / "cmp.png"
    assert cli.main(["runs", "--compare", str(first), str(second), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["runs", str(tmp_path / "none")]) == 2


def test_report_command_and_no_report_flag(finished_run, tmp_path, capsys, cifar_python_dir):
    _, run = finished_run
    out = tmp_path / "elsewhere.html"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!doctype html>")
    assert cli.main(["train", "--data", str(cifar_python_dir), "--dry-run", "--no-report",
                     "--out", str(tmp_path / "r")]) == 0
    run = tmp_path / "r"
    assert (run / "metrics.json").exists() and (run / "confusion_matrix.csv").exists()
    assert not (run / "report.html").exists() and not (run / "confusion_matrix.png").exists()  # no matplotlib
    assert cli.main(["report", str(run)]) == 0  # draws both later
    assert (run / "report.html").exists() and (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


@needs_chromium
def test_report_renders_in_headless_chromium(finished_run):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    _, run = finished_run
    ARTIFACTS.mkdir(exist_ok=True)
    errors = []
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((run / "report.html").as_uri())
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(sizes) == 9 and all(done and w > 0 and h > 0 for done, w, h in sizes)
    assert (ARTIFACTS / "report.png").stat().st_size > 20_000


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A report of an image-folder run with a validation split: every headline field has something to say."""
    root = write_image_folder(tmp_path_factory.mktemp("folder") / "photos", per_class=12, size=(24, 24))
    run = tmp_path_factory.mktemp("runs") / "run"
    assert cli.main(["train", "--data", str(root), "--epochs", "2", "--batch-size", "12", "--val-split", "0.25",
                     "--out", str(run)]) == 0
    return run


def test_the_report_says_what_was_trained_where_and_names_the_files_it_got_wrong(folder_run):
    import json
    import platform

    page = (folder_run / "report.html").read_text()
    for label in ("test accuracy", "best epoch (validation)", "final epoch (validation)", "data",
                  "image size", "images train / validation / test", "device and precision", "date"):
        assert f"<div>{label}<b>" in page, label
    assert "<b>photos (image-folder)</b>" in page and "<b>24x24, 3 channels</b>" in page
    assert "<b>27 / 9 / 18</b>" in page  # 36 training images, a quarter held out; 6 test images per class
    env = json.loads((folder_run / "config.json").read_text())["environment"]
    assert env["python"] == platform.python_version() and env["cpu class"] and env["started"]
    assert f"<td>{env['platform']}</td>" in page  # where training ran, recorded by the run
    assert re.search(r"<td>test/[abc]/\d{3}\.png</td>", page)  # top losses name their files
    assert "<details><summary>Configuration</summary>" in page  # collapsed


def test_the_best_epoch_is_named_when_the_model_overfitted():
    from cnnlab.evaluation import report

    history = [{"epoch": e, "val_acc": a} for e, a in ((1, 0.50), (2, 0.70), (3, 0.62))]
    assert "peaked at epoch 2 (70.00%) and ended at 62.00%" in report.best_epoch_note(history)
    assert report.best_epoch_note(history[:2]) is None and report.best_epoch_note(history[:1]) is None


def test_a_one_epoch_history_has_one_whole_tick():
    from cnnlab.evaluation import plots

    fig = plots.plot_history([{"epoch": 1, "train_loss": 2.0, "val_loss": 1.9, "train_acc": 0.2, "val_acc": 0.3}])
    assert [t for t in fig.axes[0].get_xticks()] == [1]


@needs_chromium
def test_the_report_in_a_browser_at_1280_px(folder_run):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(exist_ok=True)
    errors = []
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto((folder_run / "report.html").as_uri())
        labels = page.locator(".headline div").all_inner_texts()
        top_losses = page.locator("h2:has-text('Top losses') ~ table").first
        files = top_losses.locator("tbody td:first-child").all_inner_texts()
        config_visible = page.locator("details pre").is_visible()
        boxes = page.eval_on_selector_all("img[alt*=confusion]", "imgs => imgs.map(i => {"
                                          "const r = i.getBoundingClientRect(); return [r.top, r.bottom]; })")
        page.screenshot(path=str(ARTIFACTS / "report-folder.png"), full_page=True)
        browser.close()
    assert errors == []
    assert any(t.startswith("best epoch (validation)") for t in labels) and len(labels) >= 12
    assert files and all(re.fullmatch(r"test/[abc]/\d{3}\.png", f) for f in files)
    assert not config_visible
    assert len(boxes) == 2 and boxes[1][0] >= boxes[0][1]  # one confusion matrix per row, not two squeezed side by side
