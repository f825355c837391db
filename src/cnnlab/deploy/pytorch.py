"""The PyTorch side of deployment: a run directory behind the `Predictor` interface, and test-set metrics of
an exported ONNX file (torch computes the metrics). predictors.py imports this module only when it needs it,
so an ONNX prediction never imports PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnnlab import __version__, models
from cnnlab.data import Normalization
from cnnlab.deploy.predictors import Runtime, load_predictor
from cnnlab.device import pick_device
from cnnlab.errors import CnnlabError
from cnnlab.evaluation import calibration, evaluate
from cnnlab.run import Run


class TorchPredictor:
    """A run directory's final weights behind the same interface as deploy.OnnxPredictor: uint8 (N, H, W, C)
    images in, probabilities out, with the run's normalization and test-time augmentation."""

    def __init__(self, run_dir: str | Path, device: str = "auto"):
        self.device = pick_device(device)
        self.model, meta = models.load_model(run_dir, self.device)
        self.norm = Normalization.from_dict(meta["normalization"])
        self.tta = meta.get("tta", 0)
        self.info = {"name": Path(run_dir).name, "format": "pytorch", "path": str(run_dir),
                     "classes": meta["classes"], "channels": meta["in_channels"], "image_size": meta["image_size"],
                     "resize": meta.get("resize", "squish"), "source_run": str(Path(run_dir).resolve()),
                     "test_accuracy": Run.of(run_dir).recorded_accuracy(),
                     "cnnlab_version": __version__, "model": meta["model"], "calibration": meta.get("calibration"),
                     "runtime": "pytorch", "precision": meta.get("precision", "fp32")}
        self.temperature, self.calibrated = calibration.temperature_of(meta), meta.get("calibration")

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.predict(images)[0]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        logits = evaluate.predict_logits(self.model, x, self.norm, self.device, tta=self.tta)
        return (logits / self.temperature).softmax(1).numpy(), calibration.confidence(logits, self.calibrated).numpy()


def evaluate_exported(model_path: str | Path, data_path: str | None = None, runtime: Runtime = "auto") -> dict:
    """Test-set metrics of an exported model (ONNX or OpenVINO), computed by its runtime (nothing is written)."""
    predictor = load_predictor(model_path, runtime=runtime)
    info, config = predictor.info, predictor.info["data"] or {}
    if not (data_path or config.get("path")):
        raise CnnlabError(f"{model_path} does not say which data it was trained on; pass --data")
    size = tuple(config["image_size"]) if config.get("image_size") else None
    dataset = evaluate.load_as_trained(config, data_path, size)
    if dataset.classes != info["classes"] or list(dataset.image_size) != list(info["image_size"]):
        raise CnnlabError(f"the data at {dataset.source} has classes {dataset.classes} and size "
                          f"{list(dataset.image_size)}; the model expects {info['classes']} at {info['image_size']}")
    x = dataset.x_test.permute(0, 2, 3, 1).numpy()
    probs = np.concatenate([predictor.probabilities(x[i:i + 1000]) for i in range(0, len(x), 1000)] or
                           [np.zeros((0, len(info["classes"])), np.float32)])
    # the graph's probabilities are softmax(logits / T): T * log p is the logits up to a constant per image, which
    # no softmax sees, so the loss and the calibration figures are those `evaluate RUN_DIR` gives
    record = info.get("calibration")
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, None))) * calibration.temperature_of(info)
    metrics = {**evaluate.metrics_from_logits(logits, dataset.y_test, info["classes"]), "data": dataset.source}
    if record and len(dataset.y_test):
        metrics["calibration"] = calibration.summary(logits, dataset.y_test, record)
    return metrics


evaluate_onnx = evaluate_exported  # its name before OpenVINO models existed
