"""Answers you can trust: calibration (a temperature fitted on held-out logits), "unknown" below a confidence, and
Grad-CAM heatmaps of where the network looked, with the sanity checks the issue asks for."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import cli, deploy, models, presets, training
from cnnlab.config import override
from cnnlab.data.dataset import Dataset, Normalization
from cnnlab.evaluation import calibration, evaluate, explain, report
from cnnlab.evaluation.analysis import Interpretation

# ---------------------------------------------------------------------------------------------------
# Calibration arithmetic


def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    """Labels drawn from softmax(z): shown z * 3, the fit finds T close to 3, and the scaled NLL is lower."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 10, generator=g) * 2
    y = torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    t = calibration.fit_temperature(z * 3, y)
    assert t == pytest.approx(3.0, rel=0.05)
    assert calibration.scores(z * 3 / t, y)["nll"] < calibration.scores(z * 3, y)["nll"]
    assert calibration.scores(z * 3 / t, y)["ece"] < 0.02 < calibration.scores(z * 3, y)["ece"]


def test_ece_brier_and_nll_by_hand():
    """Two images at confidence 0.8 (one right) and one at 0.6 (right): bins 12 and 9 of 15."""
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.6, 0.4]])
    y = torch.tensor([0, 1, 0])
    got = calibration.scores(probs.log(), y)
    assert got["ece"] == pytest.approx((2 * abs(0.5 - 0.8) + abs(1.0 - 0.6)) / 3)
    assert got["brier"] == pytest.approx((2 * 0.2 ** 2 + 2 * 0.8 ** 2 + 2 * 0.4 ** 2) / 3)
    assert got["nll"] == pytest.approx(-(np.log(0.8) + np.log(0.2) + np.log(0.6)) / 3, rel=1e-5)
    bins = calibration.reliability(probs, y)
    assert [(b["count"], b["accuracy"]) for b in bins] == [(1, 1.0), (2, 0.5)]


def test_the_threshold_reaches_the_target_and_accepts_equal_confidences_together():
    conf = torch.tensor([0.99, 0.95, 0.9, 0.9, 0.8, 0.7])
    right = torch.tensor([True, True, True, False, True, False])
    # the top two are right; 0.9 accepts both 0.9s (3 of 4 = 75%); 0.8: 4 of 5 = 80%
    assert calibration.threshold_for(conf, right, 0.8) == pytest.approx(0.8)
    assert calibration.threshold_for(conf, right, 0.76) == pytest.approx(0.8)
    assert calibration.threshold_for(conf, right, 0.9) == pytest.approx(0.95)
    assert calibration.threshold_for(conf, ~right, 0.5) is None
    got = calibration.selective(conf, right, 0.8)
    assert got["coverage"] == pytest.approx(5 / 6) and got["accuracy"] == pytest.approx(0.8)


def test_the_confidence_regression_recovers_the_slope_and_intercept():
    g = torch.Generator().manual_seed(2)
    score = torch.randn(20_000, generator=g) * 2
    right = torch.rand(20_000, generator=g) < torch.sigmoid(1.5 * score - 1)
    a, b = calibration.fit_confidence(score, right)
    assert a == pytest.approx(1.5, rel=0.05) and b == pytest.approx(-1.0, abs=0.06)
    assert calibration.fit_confidence(score[:10], torch.ones(10, dtype=torch.bool))[0] == 0.0  # all right: flat


def test_cross_fitting_scores_each_half_with_the_other_halfs_temperature():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(400, 5, generator=g)
    logits, y = z * 2, torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    scaled, _, fits = calibration.cross_fitted(logits, y)
    t_a, t_b = (f["temperature"] for f in fits)
    ratio = (logits / scaled)[:, 0]
    halves = [ratio.isclose(torch.tensor(t, dtype=torch.float32)) for t in (t_a, t_b)]
    assert t_a != t_b and halves[0].sum() == halves[1].sum() == 200 and not (halves[0] & halves[1]).any()
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    first = order[:200]  # fitted on the first half, applied to the second: the first half got t_b
    assert calibration.fit_temperature(logits[first], y[first]) == pytest.approx(t_a)
    assert halves[1][first].all()


# ---------------------------------------------------------------------------------------------------
# A run: model.json, metrics.json, report, predict, ONNX


def test_a_run_with_a_validation_split_records_its_calibration(quick_run, tmp_path):
    meta = json.loads((quick_run / "model.json").read_text())["calibration"]
    metrics = json.loads((quick_run / "metrics.json").read_text())["calibration"]
    assert meta["fitted_on"] == "validation" and meta["temperature"] > 0 and meta["target"] == 0.95
    assert metrics["temperature"] == meta["temperature"] and metrics["fitted_on"] == "validation"
    # fitted on 500 validation images, scored on 1,000 test images it never saw
    assert metrics["after"]["nll"] < metrics["before"]["nll"]
    assert metrics["after"]["ece"] < metrics["before"]["ece"]
    assert sum(b["count"] for b in metrics["reliability_after"]) == 1000
    page = report.write_report(quick_run, Interpretation.from_run(quick_run), tmp_path / "r.html").read_text()
    assert 'alt="reliability diagrams"' in page and 'alt="accuracy against coverage"' in page
    assert 'alt="Grad-CAM heatmaps of the top losses"' in page and "fitted on the validation set" in page


def test_predict_says_unknown_below_min_confidence(quick_run, real_subset, tmp_path, capsys):
    images = [str(sorted((real_subset / "test" / c).iterdir())[i]) for c in ("cat", "ship") for i in range(4)]
    plain = deploy.predict_files(quick_run, images, 2, device="cpu")
    conf = sorted(r["confidence"] for r in plain)
    assert [r["label"] for r in plain] == [r["predictions"][0]["class"] for r in plain]  # no threshold: a class
    cut = (conf[3] + conf[4]) / 2  # four below, four above
    code = cli.main(["predict", str(quick_run), *images, "--top-k", "2", "--min-confidence", str(cut), "--json"])
    got = json.loads(capsys.readouterr().out)
    assert code == 0 and sum(r["label"] == deploy.UNKNOWN for r in got) == 4
    assert all((r["label"] == deploy.UNKNOWN) == (r["confidence"] < cut) for r in got)
    csv = tmp_path / "p.csv"
    assert cli.main(["predict", str(quick_run), *images, "--min-confidence", "auto", "--csv", str(csv)]) == 0
    rows = csv.read_text().splitlines()
    threshold = json.loads((quick_run / "model.json").read_text())["calibration"]["threshold"]
    labels = [row.split(",")[1] for row in rows[1:]]
    assert rows[0].startswith("filename,label,confidence,class_1")
    assert labels == [deploy.UNKNOWN if float(row.split(",")[2]) < threshold else row.split(",")[3] for row in rows[1:]]


def test_the_onnx_export_carries_the_temperature(quick_run, quick_onnx, real_subset):
    onnx = deploy.OnnxPredictor(quick_onnx)
    meta = json.loads((quick_run / "model.json").read_text())
    assert onnx.info["calibration"] == meta["calibration"]
    dataset = evaluate.run_dataset(quick_run, meta)
    x = dataset.x_test[:64]
    model, _ = models.load_model(quick_run)
    logits = evaluate.predict_logits(model, x, Normalization.from_dict(meta["normalization"]), torch.device("cpu"),
                                     tta=meta["tta"])
    got, conf = onnx.predict(x.permute(0, 2, 3, 1).numpy())
    t = meta["calibration"]["temperature"]
    np.testing.assert_allclose(got, (logits / t).softmax(1).numpy(), atol=2e-4)
    assert meta["calibration"]["score"] == "energy"  # the better open-set score (benchmarks/results/trust.json)
    np.testing.assert_allclose(conf, calibration.confidence(logits, meta["calibration"]).numpy(), atol=2e-4)
    assert np.abs(got - logits.softmax(1).numpy()).max() > 0.01  # the temperature changed the answer


# ---------------------------------------------------------------------------------------------------
# Grad-CAM: the command, and the sanity checks


def test_explain_writes_an_overlay_per_image(quick_run, real_subset, tmp_path, capsys):
    images = [sorted((real_subset / "test" / c).iterdir())[0] for c in ("cat", "ship")]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code = cli.main(["explain", str(quick_run), *map(str, images), str(bad), "--out", str(tmp_path / "x"),
                     "--class", "ship"])
    out, err = capsys.readouterr()
    written = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert code == 2 and "bad.jpg" in err and "could not be read (the rest were explained)" in err
    assert images[0].stem == images[1].stem  # two files of one name: each overlay is named by its folder too
    assert written == [f"cat-{images[0].stem}.ship.png", f"ship-{images[1].stem}.ship.png"]
    with Image.open(tmp_path / "x" / written[0]) as im:
        assert im.size[0] >= 224 and im.mode == "RGB"
    assert out.count("where it looked for ship") == 2
    assert cli.main(["explain", str(quick_run), str(images[0]), "--class", "zebra"]) == 2
    assert "is not one of the model's classes" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert cli.main(["explain", str(quick_run), str(images[0]), "--out", str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip().endswith("is a file; give a folder for the overlays")


@pytest.mark.parametrize("name", [*models.MODELS, "c16-p-c32-g-d10"])
def test_every_network_is_mapped_at_its_last_convolution_wider_than_1x1(name):
    """Every registered network and a layer spec, on grey 32x32 images (the 1-channel path of the overlays):
    the mapped layer is a convolution whose output is at least 2x2, no convolution called after it is, and the
    maps are at the input size, in [0, 1], each peaking at 1 or empty (no class evidence at all)."""
    torch.manual_seed(0)
    model = models.build(name, 1, 4, (32, 32)).eval()
    shapes = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.update({n: tuple(out.shape[2:])}))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.zeros(1, 1, 32, 32))
    for h in hooks:
        h.remove()
    layer = explain.target_layer(model, 1, (32, 32))
    after = list(shapes)[list(shapes).index(layer) + 1:]
    assert min(shapes[layer]) >= 2 and all(min(shapes[n]) < 2 for n in after)
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    maps = explain.heatmaps(model, x, Normalization(mean=(0.5,), std=(0.25,)), torch.tensor([0, 1, 3]))
    assert maps.shape == (3, 32, 32) and maps.min() >= 0
    assert all(float(m.max()) in (0.0, 1.0) for m in maps)
    assert explain.overlay(x, maps).shape == (3, 3, 32, 32)


def test_the_map_changes_when_the_weights_are_re_randomized(quick_run, real_subset):
    """Adebayo et al. (2018): a saliency method that gives the same map for random weights shows the image, not
    the model. The trained network's maps and a re-initialized one's barely correlate."""
    meta = json.loads((quick_run / "model.json").read_text())
    norm = Normalization.from_dict(meta["normalization"])
    x = evaluate.run_dataset(quick_run, meta).x_test[::25]
    trained, _ = models.load_model(quick_run)
    torch.manual_seed(0)
    random = models.build(meta["model"], 3, 10, (32, 32)).eval()
    target = evaluate.predict_logits(trained, x, norm, torch.device("cpu")).argmax(1)  # the class it saw
    a, b = (explain.heatmaps(m, x, norm, target).flatten(1) for m in (trained, random))
    r = [float(np.corrcoef(u, v)[0, 1]) for u, v in zip(a.numpy(), b.numpy(), strict=True) if u.std() and v.std()]
    assert len(r) >= 20 and float(np.median(r)) < 0.5


def corner_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey noise with a class pattern pasted into one random corner: class 0 a red-green checkerboard, class 1 a
    blue ring, class 2 a yellow cross (10x10 each). Returns images, labels and each one's corner (0-3)."""
    g = np.random.default_rng(seed)
    x = np.clip(128 + g.normal(0, 12, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:10, :10]
    masks = [((yy // 2 + xx // 2) % 2).astype(bool), np.abs(np.hypot(yy - 4.5, xx - 4.5) - 3.5) < 1.2,
             (abs(yy - 4.5) < 1.5) | (abs(xx - 4.5) < 1.5)]
    colours = [((220, 30, 30), (30, 200, 30)), ((30, 30, 230), None), ((230, 220, 20), None)]
    y, corner = g.integers(0, 3, n), g.integers(0, 4, n)
    for i in range(n):
        top, left = (2 if corner[i] < 2 else 20), (2 if corner[i] % 2 == 0 else 20)
        patch = x[i, top:top + 10, left:left + 10]
        on, off = colours[y[i]]
        patch[masks[y[i]]] = on
        if off is not None:
            patch[~masks[y[i]]] = off
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y), torch.from_numpy(corner)


def test_the_map_peaks_in_the_corner_that_holds_the_class_pattern(tmp_path):
    """Trained on patterns in random corners of a neutral background, the map of each test image's true class
    peaks in the quadrant that holds its pattern for most images."""
    x, y, _ = corner_images(900, seed=0)
    x_test, y_test, corner = corner_images(60, seed=1)
    ds = Dataset(x_train=x, y_train=y, x_test=x_test, y_test=y_test, classes=["checker", "ring", "cross"],
                 format="image-folder", source="corner patterns", split="generated")
    cfg = override(presets.get("quick"), epochs=4, tta=0, threads=2)
    run = training.train(replace(cfg), dataset=ds, out=tmp_path / "run", with_report=False)
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] > 0.9
    model, meta = models.load_model(run)
    maps = explain.heatmaps(model, x_test, Normalization.from_dict(meta["normalization"]), y_test)
    peak = maps.flatten(1).argmax(1)
    row, col = peak // 32, peak % 32
    found = (row >= 16).long() * 2 + (col >= 16).long()
    assert (found == corner).float().mean() >= 0.8


# ---------------------------------------------------------------------------------------------------
# The server


def test_the_server_answers_unknown_and_explains(quick_run, quick_onnx, real_subset):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cnnlab.deploy import serve

    image = sorted((real_subset / "test" / "ship").iterdir())[0]
    upload = [("files", (image.name, image.read_bytes(), "image/jpeg"))]
    with TestClient(serve.create_app(serve.ServeConfig(model=str(quick_run), device="cpu", min_confidence=1.0))) as c:
        assert c.get("/model").json()["min_confidence"] == 1.0
        everything_unknown = c.post("/predict", files=upload).json()
        answered = c.post("/predict?min_confidence=0", files=upload).json()["results"][0]
        why = c.post("/explain?class=cat", files=[("file", (image.name, image.read_bytes(), "image/jpeg"))])
        wrong_class = c.post("/explain?class=zebra", files=[("file", (image.name, image.read_bytes(), "image/jpeg"))])
    assert everything_unknown["results"][0]["label"] == deploy.UNKNOWN and everything_unknown["min_confidence"] == 1.0
    assert answered["label"] == answered["predictions"][0]["class"]
    assert why.status_code == 200 and why.json()["class"] == "cat"
    png = base64.b64decode(why.json()["overlay"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (32, 32)
    assert wrong_class.status_code == 400
    with TestClient(serve.create_app(serve.ServeConfig(model=str(quick_onnx)))) as c:
        onnx = c.post("/explain", files=[("file", (image.name, image.read_bytes(), "image/jpeg"))])
    assert onnx.status_code == 501 and "ONNX" in onnx.json()["detail"]
