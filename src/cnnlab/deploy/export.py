"""Export of a training run: one self-contained ONNX file (or OpenVINO model) that takes raw uint8 images and
gives probabilities; fp32, or int8 (int8.py) when that keeps the test accuracy within --max-drop.

Everything a deployment would otherwise have to re-implement lives inside the graph: the NHWC -> NCHW
layout change, the run's normalization, its test-time augmentation and the softmax. Class names, input
size and provenance go into the ONNX metadata, so the file alone is enough to serve the model
(`cnnlab serve model.onnx`). The export checks itself against PyTorch before the file appears; an OpenVINO model
is OpenVINO's conversion of that checked graph, checked again in OpenVINO. Intermediate files live in a temporary
folder; the result appears by rename (files.atomic_path, files.atomic_dir) or not at all.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from cnnlab import __version__, files, models
from cnnlab.data.dataset import Normalization
from cnnlab.deploy import int8 as int8_
from cnnlab.deploy.predictors import METADATA_PREFIX, OnnxPredictor, Predictor, current_export
from cnnlab.errors import CnnlabError
from cnnlab.evaluation import calibration
from cnnlab.evaluation.evaluate import run_dataset, tta_views
from cnnlab.run import Run

OPSET = 18  # the dynamo exporter's native opset; onnxruntime >= 1.14 runs it
# The largest difference in any probability allowed between onnxruntime and PyTorch. It is there to catch a
# wrong graph (an operator exported differently gives differences of 1e-2 and more); float32 kernels that sum
# in another order differ far less, but more with depth: ResNet-50 trained 3 epochs from scratch on the photo
# fixture differed by 1.44e-4 under onnxruntime 1.32 (Xeon with AMX, 2026-12-02), where 1e-4 had held.
TOLERANCE = 1e-3


class DeployModule(nn.Module):
    """uint8 (N, H, W, C) images -> (N, classes) calibrated probabilities and (N,) confidences that the answer is
    right (calibration.py): the network with its input pipeline and its calibration."""

    def __init__(self, model: nn.Module, norm: Normalization, channels: int, tta: int, calibrated: dict | None = None):
        super().__init__()
        self.model, self.tta, self.calibrated = model, tta, calibrated  # (constants in the graph)
        # names no exported node takes: the exporter calls ResNet's global average pool's output "mean", and
        # an initializer of the same name makes the graph invalid
        stats = (torch.tensor(s).expand(channels).reshape(1, channels, 1, 1).clone() for s in (norm.mean, norm.std))
        self.register_buffer("pixel_mean", next(stats))
        self.register_buffer("pixel_std", next(stats))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() / 255 - self.pixel_mean) / self.pixel_std
        # the views go through the network as one batch: one traced copy of the network in the graph, not one per
        # view (MobileNetV3 with the mirror view: 5.1-5.5 s against 10.0-11.4 s, 2 runs each), and the same numbers
        views = tta_views(x, self.tta)
        out = self.model(torch.cat([v for _, v in views])).unflatten(0, (len(views), -1))  # (views, N, classes)
        logits = sum(weight * out[k] for k, (weight, _) in enumerate(views))
        probs = (logits / calibration.temperature_of({"calibration": self.calibrated})).softmax(1)
        return probs, calibration.confidence(logits, self.calibrated)


def deploy_module(run: Run | str | Path) -> tuple[DeployModule, dict]:
    model, meta = models.load_model(run, "cpu")
    module = DeployModule(model.float(), Normalization.from_dict(meta["normalization"]), meta["in_channels"],
                          meta.get("tta", 0), meta.get("calibration"))
    return module.eval(), meta


def _metadata(run: Run, meta: dict, config: dict) -> dict[str, str]:
    fields = {"classes": meta["classes"], "channels": meta["in_channels"], "image_size": meta["image_size"],
              "resize": meta.get("resize", "squish"), "model": meta["model"], "input": "uint8 NHWC, 0-255",
              "output": "probabilities", "calibration": meta.get("calibration"),
              "source_run": str(run.path.resolve()), "test_accuracy": run.recorded_accuracy(),
              "data": config["data"], "version": __version__, "weights_sha256": meta.get("sha256")}
    return {METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


Format = Literal["onnx", "openvino"]


def default_out(run: Run, fmt: Format, int8: bool) -> Path:
    """RUN/model.onnx, RUN/model.int8.onnx, RUN/openvino/ or RUN/openvino-int8/ (folders: model.xml, model.bin)."""
    if fmt == "onnx":
        return run.file(Run.ONNX_INT8 if int8 else Run.ONNX)
    return run.file(Run.OPENVINO + ("-int8" if int8 else ""))


def export(run_dir: str | Path, out: str | Path | None = None, data_path: str | None = None, fmt: Format = "onnx",
           int8: bool = False, max_drop: float = int8_.MAX_DROP, calibration_images: int = int8_.CALIBRATION_IMAGES,
           check_images: int = 256, tolerance: float = TOLERANCE) -> dict:
    """Write a run as one checked ONNX file or OpenVINO model (`fmt`), in fp32 or, with `int8`, quantized.

    The fp32 graph is checked against PyTorch on `check_images` test images (every probability within
    `tolerance`); an int8 model is measured beside it on the whole test set and refused when it loses more than
    `max_drop` points of accuracy. Nothing is written unless every check passes. Returns the path, the checks'
    figures and the time taken.
    """
    _requirements(fmt, int8, max_drop, calibration_images)
    import onnx

    if out is not None and int8 and fmt == "onnx" and files.special_kind(Path(out)) is not None:
        raise CnnlabError(f"--out {out}: an int8 model is measured from its file before it is kept; give a file path")
    if out is not None and fmt == "openvino" and Path(out).exists() and not Path(out).is_dir():
        raise CnnlabError(f"--out {out}: an OpenVINO model is a folder (model.xml, model.bin); give a folder path")
    start = time.perf_counter()
    run = Run.of(run_dir)
    module, meta = deploy_module(run)
    config = run.config()
    dataset = run_dataset(run, meta, data_path, config)
    images = dataset.x_test[:check_images].permute(0, 2, 3, 1).contiguous()
    if len(images) == 0:
        raise CnnlabError("the run's test set is empty: nothing to check the export against; pass --data")
    out = Path(out) if out else default_out(run, fmt, int8)
    with tempfile.TemporaryDirectory(prefix="cnnlab-export-") as work:
        fp32 = Path(work) / "model.onnx"
        reused = (fmt == "openvino" or int8) and _current_fp32(run)
        if reused:
            shutil.copy(run.file(Run.ONNX), fp32)  # not traced again: 5-6 s of an int8 export of `quick`
        else:
            proto = _onnx_graph(module, meta, images)
            onnx.helper.set_model_props(proto, _metadata(run, meta, config))
            fp32.write_bytes(proto.SerializeToString())
        result = {"fp32_graph": "the run's model.onnx" if reused else "traced", "checked_images": len(images),
                  "max_abs_diff": _agreement(module, images, OnnxPredictor(fp32),
                                                                           tolerance, "onnxruntime")}
        writer = _write_onnx if fmt == "onnx" else _write_openvino
        result |= writer(fp32, out, module, images, tolerance, int8 and (dataset, max_drop, calibration_images))
    return {"path": str(out), **result, "seconds": round(time.perf_counter() - start, 2)}


def export_onnx(run_dir: str | Path, out: str | Path | None = None, data_path: str | None = None,
                check_images: int = 256, tolerance: float = TOLERANCE) -> dict:
    """Write RUN_DIR/model.onnx (or `out`), fp32, after checking it against PyTorch (`export`)."""
    return export(run_dir, out, data_path, "onnx", check_images=check_images, tolerance=tolerance)


def describe(result: dict) -> str:
    """What `cnnlab export` prints: the file, and what its checks found."""
    lines = [f"wrote {result['path']} in {result['seconds']} s; onnxruntime matches PyTorch on "
             f"{result['checked_images']} test images (largest probability difference {result['max_abs_diff']:.1e})"]
    if result.get("fp32_graph") == "the run's model.onnx":
        lines.append("(from the run's fp32 export of these weights, model.onnx: not traced again)")
    if "openvino_max_abs_diff" in result:
        lines.append(f"OpenVINO matches PyTorch too (largest difference {result['openvino_max_abs_diff']:.1e})")
    if q := result.get("int8"):
        drop = 100 * (q["fp32_accuracy"] - q["int8_accuracy"])
        lines.append(f"int8: test accuracy {100 * q['int8_accuracy']:.2f}% against fp32's "
                     f"{100 * q['fp32_accuracy']:.2f}% "
                     f"on {q['test_images']:,} images ({abs(drop):.2f} points {'lost' if drop > 0 else 'gained'}; "
                     f"at most {q['max_drop']:g} may be lost), "
                     f"ranges from {q['calibration_images']} training images")
    return "\n".join(lines)


def _requirements(fmt: Format, int8: bool, max_drop: float, calibration_images: int) -> None:
    """Refuse what cannot work before any data is read: a missing package or a setting out of range."""
    import importlib.util

    if fmt not in ("onnx", "openvino"):
        raise CnnlabError(f"unknown export format {fmt!r}: give onnx or openvino")
    if not math.isfinite(max_drop):  # below 0 is allowed: the int8 model must then beat fp32 by that much
        raise CnnlabError(f"--max-drop {max_drop}: give the points of test accuracy int8 may lose, a number")
    if calibration_images < 1:
        raise CnnlabError(f"--calibration-images {calibration_images}: give 1 or more")
    needed = ["onnx", "onnxscript", "onnxruntime"] + (["openvino"] + (["nncf"] if int8 else [])
                                                      if fmt == "openvino" else [])
    if missing := [m for m in needed if importlib.util.find_spec(m) is None]:
        extra = "openvino" if {"openvino", "nncf"} & set(missing) else "deploy"
        raise CnnlabError(f"export --format {fmt}{' --int8' if int8 else ''} needs {', '.join(missing)}: "
                          f"pip install 'cnnlab[{extra}]'")


def _current_fp32(run: Run) -> bool:
    """Whether RUN/model.onnx is this version's fp32 export of the run's current weights, which an int8 or an
    OpenVINO export may start from (it is checked against PyTorch again all the same)."""
    current = current_export(run)
    return current is not None and current.info.get("cnnlab_version") == __version__ and current.info.get(
        "precision", "fp32") == "fp32"


def _onnx_graph(module: DeployModule, meta: dict, images: torch.Tensor):
    """The module as an ONNX graph (a ModelProto): uint8 NHWC images of any batch size in."""
    example = images[:2] if len(images) >= 2 else images.expand(2, *images.shape[1:]).contiguous()
    # torch.onnx logs a warning per torchvision operator it cannot find; torchvision is not used here.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export, not ours to fix
        try:
            # optimize=False: onnxscript's graph optimizer took 0.7 of the 5.1 s the export took (11-25,
            # airbench-s); onnxruntime folds the same constants itself when it loads the file.
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=OPSET,
                                        input_names=["images"], output_names=["probabilities", "confidence"],
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, optimize=False)
        except Exception as e:
            raise CnnlabError(f"ONNX export of {meta['model']} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    proto = program.model_proto
    proto.doc_string = f"cnnlab {__version__} export: uint8 NHWC images -> class probabilities and confidences"
    return proto


def _agreement(module: DeployModule, images: torch.Tensor, predictor: Predictor, tolerance: float, runtime: str
               ) -> float:
    """The largest difference between the exported model's outputs and PyTorch's; over `tolerance` refuses."""
    with torch.no_grad():
        expected = np.concatenate([t.numpy().reshape(len(images), -1) for t in module(images)], 1)
    got = np.concatenate([a.reshape(len(images), -1) for a in predictor.predict(images.numpy())], 1)
    diff = float(np.abs(got - expected).max())
    if not diff <= tolerance:  # also catches NaN
        raise CnnlabError(f"export check failed: {runtime} and PyTorch differ by {diff:.2e} "
                          f"(allowed {tolerance:.0e}) on {len(images)} test images; nothing was written")
    return diff


def _int8_check(fp32: Predictor, int8: Predictor, dataset, max_drop: float, calibration_images: int,
                method: str) -> dict[str, str]:
    """Both models' test accuracy; the int8 model's metadata when it loses at most `max_drop` points."""
    n = len(dataset.y_test)
    fp32_accuracy, int8_accuracy = (int8_.accuracy(p, dataset.x_test, dataset.y_test) for p in (fp32, int8))
    int8_.check(fp32_accuracy, int8_accuracy, n, max_drop)
    return int8_.record(fp32_accuracy, int8_accuracy, n, calibration_images, max_drop, method)


def _write_onnx(fp32: Path, out: Path, module: DeployModule, images: torch.Tensor, tolerance: float,
                int8: tuple | bool) -> dict:
    """The checked fp32 file at `out`, or its int8 version once that passes the accuracy check."""
    with files.atomic_path(out) as tmp:
        if not int8:
            shutil.copyfile(fp32, tmp)
            return {}
        dataset, max_drop, n = int8
        sample = int8_.calibration_sample(dataset.x_train, n)
        int8_.quantize_onnx(fp32, tmp, sample)
        fields = _int8_check(OnnxPredictor(fp32), OnnxPredictor(tmp), dataset, max_drop, len(sample),
                             "onnxruntime static QDQ, per-channel int8 weights, uint8 activations, percentile ranges")
        int8_.add_metadata(tmp, fields)
        return {"int8": json.loads(fields[METADATA_PREFIX + "int8"])}


def _write_openvino(fp32: Path, out: Path, module: DeployModule, images: torch.Tensor, tolerance: float,
                    int8: tuple | bool) -> dict:
    """OpenVINO's IR of the checked fp32 graph (its own converter; the metadata comes along), checked against
    PyTorch in OpenVINO too, in the folder `out`; or, with `int8`, NNCF's int8 version once that passes."""
    from cnnlab.deploy import openvino

    ov = openvino.openvino()
    model = ov.convert_model(str(fp32))
    reference = fp32.with_suffix(".xml")
    ov.save_model(model, str(reference), compress_to_fp16=False)  # fp16 weights would move the probabilities
    fp32_model = openvino.OpenVinoPredictor(reference)
    result = {"openvino_max_abs_diff": _agreement(module, images, fp32_model, tolerance, "OpenVINO")}
    with files.atomic_dir(out) as folder:
        if not int8:
            ov.save_model(model, str(folder / openvino.IR_NAME), compress_to_fp16=False)
            return result
        dataset, max_drop, n = int8
        sample = int8_.calibration_sample(dataset.x_train, n)
        quantized = int8_.quantize_openvino(model, sample)
        staged = fp32.with_name("int8.xml")
        ov.save_model(quantized, str(staged))
        fields = _int8_check(fp32_model, openvino.OpenVinoPredictor(staged), dataset, max_drop, len(sample),
                             "NNCF post-training quantization (OpenVINO), per-channel int8 weights")
        openvino.set_metadata(quantized, fields)
        ov.save_model(quantized, str(folder / openvino.IR_NAME))
        return result | {"int8": json.loads(fields[METADATA_PREFIX + "int8"])}
