"""Using a trained model outside training: one `Predictor` interface over an ONNX file or a run directory.

An ONNX file runs through onnxruntime with NumPy and Pillow only, so a deployment does not need PyTorch;
a run directory runs through PyTorch (imported only then). Both take uint8 (N, H, W, C) images and give
class probabilities, with the model's own normalization and test-time augmentation applied.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from cnnlab.data.folders import expand_paths  # noqa: F401  (part of this module's API)
from cnnlab.data.images import MAX_PIXELS, decode_image
from cnnlab.errors import CnnlabError
from cnnlab.run import Run

METADATA_PREFIX = "cnnlab."
Runtime = Literal["auto", "onnxruntime", "openvino"]  # what runs an ONNX file (an OpenVINO model: OpenVINO)
# The server's runtime for an ONNX file, by CPU class and precision, where OpenVINO is installed: where it measured
# faster (benchmarks/deploy_speed.py, results/deploy_speed-<class>.json). avx512_bf16 (AMD EPYC with VNNI,
# 2 cores): OpenVINO ran fp32 graphs 2.0-2.8x as fast as onnxruntime at batch 64 and 1.5-2x at batch 1. int8
# ONNX files stay on onnxruntime (OpenVINO ran its QDQ graph of `quick` 1.4x slower: 3.3 s against 2.3 s for the
# test set). Classes not measured keep onnxruntime.
RUNTIME_BY_CPU: dict[tuple[str, str], Literal["onnxruntime", "openvino"]] = {("avx512_bf16", "fp32"): "openvino"}
UNKNOWN = "unknown"  # the answer below --min-confidence: the image is of none of the classes, or too unclear


class Predictor(Protocol):
    info: dict  # name, format, classes, channels, image_size, source_run, test_accuracy, cnnlab_version,
    # calibration (model.json's record: temperature, the suggested min_confidence as "threshold"; None before it)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, classes) float32 probabilities, calibrated by the run's temperature."""
        ...

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The probabilities, and (N,) confidences that the top class is right (what --min-confidence tests)."""
        ...


class OnnxPredictor:
    """An exported model (see export.py) in onnxruntime."""

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CnnlabError("running ONNX models needs onnxruntime: pip install 'cnnlab[deploy]'") from None
        path = Path(path)
        if not path.is_file():
            raise CnnlabError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, one per physical core
        options.log_severity_level = 3  # errors only: its warnings are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise CnnlabError(f"cannot load ONNX model {path}: {str(e).splitlines()[0]}") from None
        self.info = exported_info(self.session.get_modelmeta().custom_metadata_map, path, "onnx")
        self.info["runtime"] = "onnxruntime"
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.predict(images)[0]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.uint8)})
        # exports from before calibration have one output: their confidence is the top probability
        return outputs[0], outputs[1] if len(outputs) > 1 else outputs[0].max(1)


def exported_info(meta: dict[str, str], path: Path, fmt: str) -> dict:
    """A Predictor's `info` from an exported model's metadata (export.py writes it; OpenVINO's converter keeps it)."""
    if METADATA_PREFIX + "classes" not in meta:
        raise CnnlabError(f"{path} was not exported by cnnlab (no class names in its metadata); "
                          "use `cnnlab export RUN_DIR`")

    def field(key: str, default: str = "null"):
        return json.loads(meta.get(METADATA_PREFIX + key, default))
    return {
        "name": _model_name(path, meta.get(METADATA_PREFIX + "source_run")), "format": fmt, "path": str(path),
        "classes": field("classes"), "channels": int(meta[METADATA_PREFIX + "channels"]),
        "image_size": field("image_size"),
        "resize": meta.get(METADATA_PREFIX + "resize", "squish"),  # models exported before it existed squished
        "source_run": meta.get(METADATA_PREFIX + "source_run"), "test_accuracy": field("test_accuracy"),
        "cnnlab_version": meta.get(METADATA_PREFIX + "version"), "data": field("data"),
        "weights_sha256": meta.get(METADATA_PREFIX + "weights_sha256"), "calibration": field("calibration"),
        "precision": meta.get(METADATA_PREFIX + "precision", "fp32"), "int8": field("int8"),
    }


def predict_of(predictor: Predictor):
    """`predictor.predict`, or for an object with only `probabilities` (a Predictor written before confidences
    existed) one that takes the top probability as the confidence."""
    if hasattr(predictor, "predict"):
        return predictor.predict

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs = np.asarray(predictor.probabilities(images))
        return probs, probs.max(1)
    return predict


def self_check(predictor: Predictor) -> Predictor:
    """One inference on a blank batch of two, before serving: weights that give NaN, or metadata that disagrees
    with the graph (another class count, another input size), are refused here rather than as 500s later."""
    info = predictor.info
    blank = np.full((2, *info["image_size"], info["channels"]), 128, np.uint8)
    try:
        probs = np.asarray(predictor.probabilities(blank))
    except CnnlabError:
        raise
    except Exception as e:  # onnxruntime and PyTorch raise their own types for shape mismatches
        raise CnnlabError(f"{info['path']} fails its self-check: a {info['image_size']} x {info['channels']}-channel "
                          f"input, as its metadata says, gives {str(e).splitlines()[0][:200]}") from None
    if probs.shape != (2, len(info["classes"])) or not np.isfinite(probs).all():
        what = f"shape {probs.shape}" if probs.shape != (2, len(info["classes"])) else "non-finite probabilities"
        raise CnnlabError(f"{info['path']} fails its self-check: {what} for {len(info['classes'])} classes "
                          "(damaged weights, or metadata that does not match the graph)")
    return predictor


def is_onnx(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".onnx")


def is_openvino(path: str | os.PathLike) -> bool:
    """An OpenVINO model: its .xml file, or the folder `cnnlab export --format openvino` writes (model.xml and
    model.bin; a run directory, which has model.json, is not one)."""
    path = Path(path)
    return path.suffix.lower() == ".xml" or (path.is_dir() and (path / "model.xml").is_file()
                                              and not (path / Run.META).exists())


def is_exported(path: str | os.PathLike) -> bool:
    return is_onnx(path) or is_openvino(path)


def load_predictor(path: str | os.PathLike, device: str = "auto", exported: bool = False,
                   runtime: Runtime = "auto", serving: bool = False) -> Predictor:
    """An exported model (an ONNX file in `runtime`, see pick_runtime; an OpenVINO model in OpenVINO) or a run
    directory (PyTorch). With `exported`, a run directory is run through its own ONNX export when that is current
    (`current_export`): no PyTorch to import."""
    from cnnlab.deploy.openvino import OpenVinoPredictor  # imports OpenVINO only when it makes one

    if is_openvino(path):
        return OpenVinoPredictor(path)
    if is_onnx(path):
        if runtime != "auto":
            return OpenVinoPredictor(path) if pick_runtime(runtime) == "openvino" else OnnxPredictor(path)
        model = OnnxPredictor(path)
        if pick_runtime(runtime, model.info["precision"], serving) == "openvino":
            return OpenVinoPredictor(path)
        return model
    if exported and device in ("auto", "cpu") and (onnx := current_export(path)) is not None:
        return onnx

    from cnnlab.deploy.pytorch import TorchPredictor  # PyTorch only when a run directory is served

    return TorchPredictor(path, device)


def current_export(run_dir: str | os.PathLike) -> OnnxPredictor | None:
    """RUN/model.onnx (what `cnnlab export RUN` writes) in onnxruntime, when it was exported from the run's
    current weights (the weights' SHA-256 in model.json and in the graph's metadata agree) and onnxruntime is
    installed; else None. Predicting one image this way took 0.14 s against 0.86 s through PyTorch, nearly all
    of it PyTorch's import (Xeon with AMX, avx512_bf16; benchmarks/time_to_result.py --predict-only)."""
    import importlib.util

    run = Run.of(run_dir)
    path = run.file(Run.ONNX)
    if not path.is_file() or importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        digest = run.export_digest()
        predictor = OnnxPredictor(path)
    except (OSError, ValueError, CnnlabError):
        return None
    return predictor if digest and predictor.info.get("weights_sha256") == digest else None


def _model_name(path: Path, source_run: str | None) -> str:
    """What to call an exported model: its file's stem, or its run's name for the default names (`model.onnx`,
    `model.int8.onnx`: the run's name and `.int8`; an OpenVINO folder's `model.xml`)."""
    if source_run and (path.stem == "model" or path.stem.startswith("model.")):
        return Path(source_run).name + path.stem[len("model"):]
    return path.stem


def pick_runtime(runtime: Runtime, precision: str = "fp32", serving: bool = False
                 ) -> Literal["onnxruntime", "openvino"]:
    """What runs an ONNX file. `auto`: onnxruntime, which `cnnlab[deploy]` installs; for the server, OpenVINO where
    it is installed and measured faster on this CPU class for a model of this precision (RUNTIME_BY_CPU). A
    one-off `predict` or `evaluate` keeps onnxruntime: importing OpenVINO alone takes 0.37 s, more than
    classifying an image (0.14 s in all through onnxruntime)."""
    import importlib.util

    from cnnlab.hardware import cpu_class

    installed = importlib.util.find_spec("openvino") is not None
    if runtime == "openvino" and not installed:
        raise CnnlabError("--runtime openvino needs OpenVINO: pip install 'cnnlab[openvino]'")
    if runtime != "auto":
        return runtime
    if not (serving and installed):
        return "onnxruntime"
    return RUNTIME_BY_CPU.get((cpu_class(), precision), "onnxruntime")


def decode_for(predictor: Predictor, source: bytes | str | os.PathLike, name: str | None = None,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    info = predictor.info
    return decode_image(source, info["channels"], tuple(info["image_size"]), max_pixels, name,
                        info.get("resize", "squish"))


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[list[dict]]:
    """Per row, the k most probable classes (highest first) as {"class", "probability"}."""
    k = max(1, min(k, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class": classes[int(i)], "probability": float(row[i])} for i in idx]
            for row, idx in zip(probs, order, strict=True)]


def min_confidence_for(predictor: Predictor, value: float | str | None) -> float | None:
    """--min-confidence as a number: `auto` is the threshold the run suggests (model.json's calibration record:
    the lowest confidence at which its held-out images reach 95% accuracy); None: every image gets a class."""
    if value != "auto":
        return None if value is None else float(value)
    threshold = (predictor.info.get("calibration") or {}).get("threshold")
    if threshold is None:
        raise CnnlabError(f"{predictor.info['name']} suggests no --min-confidence (trained before calibration, or "
                          "no threshold reached 95% accuracy on its held-out images); give a number from 0 to 1")
    return float(threshold)


def answer(predictions: list[dict], confidence: float, min_confidence: float | None) -> dict:
    """The answer for one image: its most probable class, or UNKNOWN when the confidence that it is right is
    below `min_confidence`."""
    known = min_confidence is None or confidence >= min_confidence
    return {"label": predictions[0]["class"] if known else UNKNOWN, "confidence": float(confidence)}


def predict_files(model: str | os.PathLike, paths: list[str], k: int = 3, device: str = "auto",
                  batch_size: int = 256, min_confidence: float | str | None = None, runtime: Runtime = "auto"
                  ) -> list[dict]:
    """Per image file (folders: every image under them), with an ONNX file or a run directory: its answer
    (`label`: the top class, or "unknown" when `confidence`, the chance that it is right, is below
    `min_confidence`, a number or "auto") and its top-k
    classes and calibrated probabilities. A file that cannot be read gets {"filename", "error"} instead, and the
    others are still classified."""
    predictor = load_predictor(model, device, exported=True, runtime=runtime)
    threshold = min_confidence_for(predictor, min_confidence)
    results = []
    for i in range(0, len(paths := expand_paths(paths)), batch_size):
        decoded: dict[str, np.ndarray | str] = {}
        for p in paths[i:i + batch_size]:
            try:
                decoded[p] = decode_for(predictor, p)
            except CnnlabError as e:
                decoded[p] = str(e)
        good = [p for p, a in decoded.items() if not isinstance(a, str)]
        preds = {}
        if good:
            probs, conf = predictor.predict(np.stack([decoded[p] for p in good]))
            preds = dict(zip(good, zip(top_k(probs, predictor.info["classes"], k), conf, strict=True), strict=True))
        results += [{"filename": str(p), **answer(*preds[p], threshold), "predictions": preds[p][0]} if p in preds
                    else {"filename": str(p), "error": a} for p, a in decoded.items()]
    return results
