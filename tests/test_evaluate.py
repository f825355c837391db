"""Metrics against hand-computed values, the confusion-matrix files and heatmap, and prediction."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import deploy, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.data import decode
from cnnlab.evaluation import evaluate, plots
from conftest import write_image_folder

Y_TRUE = [0, 0, 1, 1, 2, 2, 2]
Y_PRED = [0, 1, 1, 1, 2, 0, 2]


def test_confusion_matrix_on_a_known_example():
    cm = evaluate.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert evaluate.confusion_matrix([3], [0], 4)[3, 0] == 1  # classes with no examples still get rows


def test_per_class_scores_match_hand_computation():
    scores = evaluate.per_class_scores(evaluate.confusion_matrix(Y_TRUE, Y_PRED, 3), ["a", "b", "c"])
    rows = {r["class"]: r for r in scores["per_class"]}
    assert rows["a"]["precision"] == pytest.approx(1 / 2) and rows["a"]["recall"] == pytest.approx(1 / 2)
    assert rows["b"]["precision"] == pytest.approx(2 / 3) and rows["b"]["recall"] == pytest.approx(1.0)
    assert rows["c"]["precision"] == pytest.approx(1.0) and rows["c"]["recall"] == pytest.approx(2 / 3)
    assert [rows[c]["f1"] for c in "abc"] == pytest.approx([0.5, 0.8, 0.8])
    assert [rows[c]["support"] for c in "abc"] == [2, 2, 3]
    assert scores["macro_avg"]["f1"] == pytest.approx(0.7)
    assert scores["weighted_avg"]["f1"] == pytest.approx(5 / 7)
    assert scores["weighted_avg"]["recall"] == pytest.approx(5 / 7)  # weighted recall is accuracy


def test_class_never_predicted_scores_zero_not_nan():
    scores = evaluate.per_class_scores(evaluate.confusion_matrix([0, 1], [0, 0], 2), ["a", "b"])
    assert scores["per_class"][1] == {"class": "b", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_heatmap_has_names_counts_and_axis_labels():
    cm = evaluate.confusion_matrix(Y_TRUE, Y_PRED, 3)
    fig = plots.plot_confusion_matrix(cm, ["cat", "dog", "eel"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Predicted" and ax.get_ylabel() == "True"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "eel"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "eel"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(str(v) for v in cm.flatten())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A seed model trained on an easy image folder (class = brightest channel)."""
    root = write_image_folder(tmp_path_factory.mktemp("imgs") / "set", per_class=40, size=(16, 16))
    out = tmp_path_factory.mktemp("runs") / "run"
    training.train(TrainConfig(epochs=3, batch_size=16, normalize="meanstd"), DataConfig(path=str(root)), out=out)
    return root, out


def test_evaluation_files_agree_with_the_model(trained_run):
    root, run = trained_run
    metrics = evaluate.evaluate_run(run)
    cm = np.array(json.loads((run / "confusion_matrix.json").read_text())["matrix"])
    assert cm.sum() == metrics["test_images"] == 60
    assert metrics["test_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert metrics["test_accuracy"] > 0.9  # the task is easy: it must be learned
    rows = list(csv.reader((run / "confusion_matrix.csv").open()))
    assert rows[0] == ["true \\ predicted", "a", "b", "c"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == cm.tolist()
    assert (run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"] and len(saved["per_class"]) == 3


def test_predict_any_size_and_mode(trained_run, tmp_path):
    _, run = trained_run
    big = np.zeros((50, 70, 3), dtype=np.uint8)
    big[:, :, 2] = 230  # brightest in blue: class "c"
    Image.fromarray(big).save(tmp_path / "blue.jpg")
    Image.fromarray(big).convert("L").save(tmp_path / "gray.png")
    results = deploy.predict_files(run, [str(tmp_path / "blue.jpg"), str(tmp_path / "gray.png")], k=2)
    assert [r["filename"] for r in results] == [str(tmp_path / "blue.jpg"), str(tmp_path / "gray.png")]
    blue = results[0]["predictions"]
    assert len(blue) == 2 and blue[0]["class"] == "c"
    assert blue[0]["probability"] >= blue[1]["probability"] and 0.5 < blue[0]["probability"] <= 1


def test_predict_probabilities_match_evaluation(trained_run):
    root, run = trained_run
    test_file = sorted((root / "test" / "b").iterdir())[0]
    top = deploy.predict_files(run, [str(test_file)], k=3)[0]["predictions"]
    assert sum(p["probability"] for p in top) == pytest.approx(1.0, abs=1e-5)
    assert torch.tensor([p["probability"] for p in top]).diff().le(0).all()


def test_evaluating_a_run_reuses_the_decoded_cache(trained_run, monkeypatch):
    from cnnlab import data
    data.load_dataset(trained_run[0])  # what training did: fill the cache with the run's own data settings
    before = decode.decoded()
    assert evaluate.evaluate_run(trained_run[1])["test_images"] == 60
    assert decode.decoded() == before, "evaluation decoded the images again"


def test_evaluating_on_other_data_never_changes_what_the_run_recorded(trained_run, tmp_path, capsys):
    """`evaluate RUN --data OTHER` used to overwrite the run's metrics.json (and so `cnnlab runs` and a later
    export) with the foreign figure."""
    import shutil

    from cnnlab import cli

    root, run = trained_run
    other = tmp_path / "harder"
    shutil.copytree(root, other)
    for f in sorted((other / "test" / "a").iterdir())[:10]:  # ten a's now labelled b: a lower accuracy
        f.rename(other / "test" / "b" / f"moved-{f.name}")
    recorded = {n: (run / n).read_bytes() for n in ("metrics.json", "confusion_matrix.json", "confusion_matrix.csv")}
    assert cli.main(["evaluate", str(run), "--data", str(other)]) == 0
    assert str(run / "evaluations" / "harder") in capsys.readouterr().out
    assert {n: (run / n).read_bytes() for n in recorded} == recorded
    theirs = json.loads((run / "evaluations" / "harder" / "metrics.json").read_text())
    assert theirs["data"] == str(other.resolve()) and theirs["test_accuracy"] < json.loads(recorded["metrics.json"])[
        "test_accuracy"]
    assert cli.main(["evaluate", str(run), "--data", str(other), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "metrics.json").exists()
    assert cli.main(["evaluate", str(run), "--data", str(root)]) == 0  # its own data: the run's own files
    assert not (run / "evaluations" / root.name).exists()


def test_balanced_and_top5_accuracy_by_hand():
    classes = [f"c{i}" for i in range(7)]
    y = torch.tensor([0, 0, 0, 0, 1, 2])
    logits = torch.zeros(6, 7)
    logits[torch.arange(6), torch.tensor([0, 0, 0, 0, 0, 0])] = 5.0  # everything called c0
    logits[4, 1], logits[5, 6] = 4.0, 4.0  # image 4's class is second, image 5's sixth: in and out of the top 5
    logits[5, 2] = -1.0
    m = evaluate.metrics_from_logits(logits, y, classes)
    assert m["test_accuracy"] == pytest.approx(4 / 6)
    assert m["test_balanced_accuracy"] == pytest.approx((1 + 0 + 0) / 3)  # over the classes that have images
    assert m["test_top5_accuracy"] == pytest.approx(5 / 6)
    assert "test_top5_accuracy" not in evaluate.metrics_from_logits(logits[:, :5], y, classes[:5])
