"""ONNX export (parity with PyTorch, metadata, refusal on mismatch) and ONNX models in predict/evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install -e '.[deploy]'")

from cnnlab import cli, deploy
from cnnlab.deploy import export, pytorch  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402
from cnnlab.evaluation import evaluate
from conftest import CLASSES  # noqa: E402


def test_export_matches_pytorch_and_carries_its_metadata(quick_run, quick_onnx, real_subset):
    model = deploy.OnnxPredictor(quick_onnx)
    assert model.info["classes"] == CLASSES
    assert model.info["channels"] == 3 and model.info["image_size"] == [32, 32]
    assert model.info["resize"] == pytorch.TorchPredictor(quick_run, "cpu").info["resize"] == "crop"  # as trained
    assert model.info["cnnlab_version"] and model.info["source_run"] == str(quick_run.resolve())
    expected_accuracy = json.loads((quick_run / "metrics.json").read_text())["test_accuracy"]
    assert model.info["test_accuracy"] == pytest.approx(expected_accuracy)
    inp = model.session.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3] and isinstance(inp.shape[0], str)

    torch_model = pytorch.TorchPredictor(quick_run, "cpu")
    rng = np.random.default_rng(0)
    for batch in (1, 7, 300):  # the batch axis is dynamic
        images = rng.integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8)
        got = model.probabilities(images)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(got, torch_model.probabilities(images), atol=1e-4)


def test_export_reports_its_check(quick_run, tmp_path):
    result = export.export_onnx(quick_run, tmp_path / "m.onnx", check_images=64)
    assert result["checked_images"] == 64 and result["max_abs_diff"] <= 1e-4
    assert (tmp_path / "m.onnx").stat().st_size > 100_000


def test_failed_export_check_writes_nothing(quick_run, tmp_path, monkeypatch):
    real = deploy.OnnxPredictor.predict

    def wrong(self, x):  # a graph whose probabilities are off
        probs, conf = real(self, x)
        return probs + 1e-2, conf
    monkeypatch.setattr(deploy.OnnxPredictor, "predict", wrong)
    with pytest.raises(CnnlabError, match="export check failed"):
        export.export_onnx(quick_run, tmp_path / "m.onnx", check_images=16)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary copy


def test_predict_with_onnx_runs_without_pytorch(quick_run, quick_onnx, real_subset):
    images = [str(real_subset / "test" / c / sorted(p.name for p in (real_subset / "test" / c).iterdir())[0])
              for c in ("cat", "ship", "truck")]
    code = ("import json, sys; from cnnlab import cli; rc = cli.main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "predict", str(quick_onnx), *images, "--json", "--top-k", "4"],
                          capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == {"rc": 0, "torch": False}
    via_onnx = json.loads(proc.stdout)
    via_torch = deploy.predict_files(quick_run, images, 4, device="cpu")
    assert [r["filename"] for r in via_onnx] == images
    for a, b in zip(via_onnx, via_torch, strict=True):
        assert len(a["predictions"]) == 4
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert [p["probability"] for p in a["predictions"]] == pytest.approx(
            [p["probability"] for p in b["predictions"]], abs=1e-4)


def _predict_in_a_fresh_process(*args) -> tuple[dict, list]:
    code = ("import json, sys; from cnnlab import cli; rc = cli.main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, "predict", *args, "--json"], capture_output=True, text=True,
                          timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1]), json.loads(proc.stdout)


def test_predict_on_a_run_uses_its_current_export_and_no_pytorch(quick_run, quick_onnx, real_subset, tmp_path):
    """A run directory holding the export of its own weights predicts through onnxruntime (no PyTorch import,
    the slow part of classifying one image); an export of other weights is never used."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    image = str(next((real_subset / "test" / "ship").iterdir()))
    status, torch_says = _predict_in_a_fresh_process(str(run), image)
    assert status == {"rc": 0, "torch": True}  # not exported: PyTorch
    shutil.copy(quick_onnx, run / "model.onnx")
    status, onnx_says = _predict_in_a_fresh_process(str(run), image)
    assert status == {"rc": 0, "torch": False}
    a, b = torch_says[0]["predictions"], onnx_says[0]["predictions"]
    assert [p["class"] for p in a] == [p["class"] for p in b]
    assert [p["probability"] for p in a] == pytest.approx([p["probability"] for p in b], abs=1e-4)
    import onnx

    graph = onnx.load(run / "model.onnx")
    for prop in graph.metadata_props:
        if prop.key == "cnnlab.weights_sha256":
            prop.value = "0" * 64  # an export of other weights (a run trained on after its export)
    onnx.save(graph, run / "model.onnx")
    assert _predict_in_a_fresh_process(str(run), image)[0] == {"rc": 0, "torch": True}
    assert deploy.current_export(run) is None and deploy.current_export(quick_run) is None


def test_evaluate_onnx_agrees_with_pytorch(quick_run, quick_onnx, capsys):
    metrics = pytorch.evaluate_onnx(quick_onnx)
    dataset = evaluate.run_dataset(quick_run, json.loads((quick_run / "model.json").read_text()))
    probs = pytorch.TorchPredictor(quick_run, "cpu").probabilities(dataset.x_test.permute(0, 2, 3, 1).numpy())
    torch_accuracy = float((probs.argmax(1) == dataset.y_test.numpy()).mean())
    assert metrics["test_images"] == len(dataset.y_test) == 1000
    assert abs(metrics["test_accuracy"] - torch_accuracy) <= 0.002  # at most 2 near-ties may flip
    assert metrics["test_accuracy"] > 0.3  # far above chance: the graph really is the trained model
    recorded = json.loads((quick_run / "metrics.json").read_text())  # the run's own loss and calibration figures
    assert metrics["test_loss"] == pytest.approx(recorded["test_loss"], abs=2e-3)
    for when in ("before", "after"):
        assert metrics["calibration"][when]["ece"] == pytest.approx(recorded["calibration"][when]["ece"], abs=5e-3)
    assert cli.main(["evaluate", str(quick_onnx)]) == 0
    assert f"Test accuracy: {metrics['test_accuracy']:.4f}" in capsys.readouterr().out


def test_deploy_errors_are_one_line(quick_onnx, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.onnx").write_bytes(b"\x00garbage")
    for args in (["export", str(tmp_path / "missing")],
                 ["predict", str(tmp_path / "missing.onnx"), str(tmp_path / "notes.txt")],
                 ["predict", str(tmp_path / "fake.onnx"), str(tmp_path / "notes.txt")],
                 ["predict", str(quick_onnx), str(tmp_path / "notes.txt")],
                 ["evaluate", str(tmp_path / "fake.onnx")],
                 ["serve", str(tmp_path / "missing.onnx"), "--port", "0"]):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("cnnlab: error: ") and err.count("\n") == 1, err
