"""Deploying fast: `export --int8` (checked for accuracy, refused when it loses too much), `--format openvino`
(fp32 and int8), and OpenVINO models in predict, evaluate and serve, on the `quick` run of the real subset."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install -e '.[deploy]'")

from cnnlab import cli, deploy  # noqa: E402
from cnnlab.deploy import pytorch  # noqa: E402
from cnnlab.evaluation import evaluate  # noqa: E402

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="the openvino extra is not installed: pip install -e '.[openvino]'")


def _test_set(run):
    dataset = evaluate.run_dataset(run, json.loads((run / "model.json").read_text()))
    return dataset.x_test.permute(0, 2, 3, 1).contiguous().numpy(), dataset.y_test.numpy()


def _accuracy(predictor, x, y) -> float:
    return float((predictor.probabilities(x).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory, quick_run):
    out = tmp_path_factory.mktemp("int8") / "quick.int8.onnx"
    assert cli.main(["export", str(quick_run), "--int8", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def openvino_models(tmp_path_factory, quick_run):
    """The fp32 and int8 OpenVINO exports of the quick run (folders), exported through the CLI."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    root = tmp_path_factory.mktemp("openvino")
    for name, extra in (("fp32", []), ("int8", ["--int8"])):
        assert cli.main(["export", str(quick_run), "--format", "openvino", "--out", str(root / name), *extra]) == 0
    return root / "fp32", root / "int8"


def test_int8_export_is_measured_and_records_both_accuracies(quick_run, quick_onnx, int8_onnx, capsys):
    int8 = deploy.OnnxPredictor(int8_onnx)
    fp32 = deploy.OnnxPredictor(quick_onnx)
    x, y = _test_set(quick_run)
    record = int8.info["int8"]
    # what the metadata says is what each model scores on the whole test set, measured here independently
    assert record["test_images"] == len(y) == 1000
    assert record["fp32_accuracy"] == pytest.approx(_accuracy(fp32, x, y), abs=1e-9)
    assert record["int8_accuracy"] == pytest.approx(_accuracy(int8, x, y), abs=1e-9)
    assert int8.info["test_accuracy"] == record["int8_accuracy"] and int8.info["precision"] == "int8"
    assert record["fp32_accuracy"] - record["int8_accuracy"] <= 0.01 and record["int8_accuracy"] > 0.3
    assert record["calibration_images"] == 300 and record["max_drop"] == 1.0
    # really int8: weights a quarter the size, integer convolutions in the graph; same classes, same calibration
    assert int8_onnx.stat().st_size < 0.5 * quick_onnx.stat().st_size
    import onnx

    ops = {n.op_type for n in onnx.load(int8_onnx).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.info["classes"] == fp32.info["classes"] and int8.info["calibration"] == fp32.info["calibration"]
    agree = (int8.probabilities(x).argmax(1) == fp32.probabilities(x).argmax(1)).mean()
    assert agree >= 0.95, agree  # Ultralytics #5016's failure: an export that matches on 46% of images
    assert int8.info["name"] == "quick.int8"


def test_int8_export_that_loses_too_much_is_refused_and_writes_nothing(quick_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # -100: the int8 model would have to beat fp32 by 100 points
    assert cli.main(["export", str(quick_run), "--int8", "--max-drop", "-100", "--out", str(out / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing was written" in err and "--max-drop -100" in err
    int8_accuracy, fp32_accuracy = (float(v) for v in
                                    re.findall(r"([0-9.]+)% (?:against|on)", err))
    assert 30 < int8_accuracy <= 100 and 30 < fp32_accuracy <= 100  # both accuracies are named
    assert list(out.iterdir()) == []


def test_export_settings_are_checked_before_any_data_is_read(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert cli.main(["export", str(missing), "--int8", "--max-drop", "nan"]) == 2
    assert "--max-drop nan" in capsys.readouterr().err  # not "no such run": the settings come first
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(missing), "--int8", "--calibration-images", "0"])
    assert e.value.code == 2 and "--calibration-images" in capsys.readouterr().err
    # outputs an export cannot be kept in: refused before the run is even looked up
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file.xml").write_text("")
    for args, says in ((["--int8", "--out", "/dev/null"], "give a file path"),
                       (["--int8", "--out", str(fifo)], "give a file path"),
                       (["--format", "openvino", "--out", str(tmp_path / "file.xml")], "give a folder path"),
                       (["--format", "openvino", "--out", str(fifo)], "give a folder path")):
        assert cli.main(["export", str(missing), *args]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "file.xml"]


@needs_openvino
def test_openvino_export_matches_pytorch_and_carries_the_metadata(quick_run, quick_onnx, openvino_models):
    from cnnlab.deploy.openvino import OpenVinoPredictor

    fp32, _ = openvino_models
    assert sorted(p.name for p in fp32.iterdir()) == ["model.bin", "model.xml"]
    model, onnx_model = OpenVinoPredictor(fp32), deploy.OnnxPredictor(quick_onnx)
    assert model.info["format"] == "openvino" and model.info["runtime"] == "openvino"
    same = ("classes", "channels", "image_size", "resize", "calibration", "test_accuracy", "weights_sha256", "data")
    assert {k: model.info[k] for k in same} == {k: onnx_model.info[k] for k in same}
    torch_model = pytorch.TorchPredictor(quick_run, "cpu")
    rng = np.random.default_rng(1)
    for batch in (1, 7, 65):  # the batch axis stays dynamic
        images = rng.integers(0, 256, size=(batch, 32, 32, 3), dtype=np.uint8)
        (probs, conf), (want_probs, want_conf) = model.predict(images), torch_model.predict(images)
        np.testing.assert_allclose(probs, want_probs, atol=1e-4)
        np.testing.assert_allclose(conf, want_conf, atol=1e-4)
    # an exported .onnx file in OpenVINO (--runtime openvino) gives the same answers as in onnxruntime
    via_openvino = deploy.load_predictor(quick_onnx, runtime="openvino")
    assert via_openvino.info["runtime"] == "openvino" and via_openvino.info["format"] == "onnx"
    np.testing.assert_allclose(via_openvino.probabilities(images), onnx_model.probabilities(images), atol=1e-5)


@needs_openvino
def test_openvino_int8_is_measured_and_answers_like_fp32(quick_run, openvino_models):
    from cnnlab.deploy.openvino import OpenVinoPredictor

    fp32, int8 = OpenVinoPredictor(openvino_models[0]), OpenVinoPredictor(openvino_models[1] / "model.xml")
    x, y = _test_set(quick_run)
    record = int8.info["int8"]
    assert int8.info["precision"] == "int8" and record["test_images"] == len(y)
    assert record["int8_accuracy"] == pytest.approx(_accuracy(int8, x, y), abs=1e-9)
    assert record["fp32_accuracy"] == pytest.approx(_accuracy(fp32, x, y), abs=1e-9)
    assert record["fp32_accuracy"] - record["int8_accuracy"] <= 0.01
    assert (int8.probabilities(x).argmax(1) == fp32.probabilities(x).argmax(1)).mean() >= 0.95
    assert (openvino_models[1] / "model.bin").stat().st_size < 0.5 * (openvino_models[0] / "model.bin").stat().st_size


@needs_openvino
def test_openvino_refusal_leaves_no_folder(quick_run, tmp_path, capsys):
    assert cli.main(["export", str(quick_run), "--format", "openvino", "--int8", "--max-drop", "-100",
                     "--out", str(tmp_path / "ov")]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_openvino
def test_openvino_models_predict_and_evaluate_without_pytorch(quick_run, quick_onnx, openvino_models, real_subset,
                                                               capsys):
    fp32, int8 = openvino_models
    image = str(sorted((real_subset / "test" / "ship").iterdir())[0])
    code = ("import json, sys; from cnnlab import cli; rc = cli.main(sys.argv[1:]); "
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}), file=sys.stderr)")
    said = {}
    for model in (fp32, fp32 / "model.xml", int8):
        proc = subprocess.run([sys.executable, "-c", code, "predict", str(model), image, "--json"],
                              capture_output=True, text=True, timeout=120)
        assert json.loads(proc.stderr.strip().splitlines()[-1]) == {"rc": 0, "torch": False}, proc.stderr
        said[str(model)] = json.loads(proc.stdout)[0]
    via_torch = deploy.predict_files(quick_run, [image], 5, device="cpu")[0]
    assert said[str(fp32)]["predictions"][0]["class"] == via_torch["predictions"][0]["class"]
    assert said[str(fp32)]["predictions"][0]["probability"] == pytest.approx(
        via_torch["predictions"][0]["probability"], abs=1e-4)
    assert said[str(int8)]["predictions"][0]["probability"] == pytest.approx(
        via_torch["predictions"][0]["probability"], abs=0.1)  # int8: near, not equal

    metrics = pytorch.evaluate_exported(fp32)
    assert metrics["test_accuracy"] == pytest.approx(pytorch.evaluate_exported(quick_onnx)["test_accuracy"], abs=2e-3)
    assert cli.main(["evaluate", str(int8)]) == 0
    assert f"Test accuracy: {deploy.load_predictor(int8).info['int8']['int8_accuracy']:.4f}" in capsys.readouterr().out


@needs_openvino
def test_serve_runs_an_openvino_model(openvino_models, real_subset):
    from fastapi.testclient import TestClient

    from cnnlab.deploy import serve

    image = sorted((real_subset / "test" / "cat").iterdir())[0]
    app = serve.create_app(serve.ServeConfig(model=str(openvino_models[1])))
    with TestClient(app) as client:
        info = client.get("/model").json()
        assert info["format"] == "openvino" and info["precision"] == "int8" and info["runtime"] == "openvino"
        reply = client.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/jpeg"))])
        assert reply.status_code == 200, reply.text
        top = reply.json()["results"][0]["predictions"][0]
        assert top["class"] in info["classes"] and 0 < top["probability"] <= 1
        assert client.post("/explain", files={"file": (image.name, image.read_bytes())}).status_code == 501


@needs_openvino
def test_the_server_runs_onnx_files_in_the_runtime_measured_faster(quick_onnx, int8_onnx):
    """`auto`: for the server, the table measured per CPU class and precision; for a one-off predict, onnxruntime
    (OpenVINO's import alone costs more than classifying an image)."""
    from cnnlab.deploy import predictors
    from cnnlab.hardware import cpu_class

    for path, precision in ((quick_onnx, "fp32"), (int8_onnx, "int8")):
        want = predictors.RUNTIME_BY_CPU.get((cpu_class(), precision), "onnxruntime")
        assert deploy.load_predictor(path, serving=True).info["runtime"] == want
        assert deploy.load_predictor(path).info["runtime"] == "onnxruntime"
        assert deploy.load_predictor(path, runtime="openvino").info["runtime"] == "openvino"
        assert deploy.load_predictor(path, runtime="onnxruntime", serving=True).info["runtime"] == "onnxruntime"
