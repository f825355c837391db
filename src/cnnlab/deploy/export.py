"""ONNX export of a training run: one self-contained file that takes raw uint8 images and gives probabilities.

Everything a deployment would otherwise have to re-implement lives inside the graph: the NHWC -> NCHW
layout change, the run's normalization, its test-time augmentation and the softmax. Class names, input
size and provenance go into the ONNX metadata, so the file alone is enough to serve the model
(`cnnlab serve model.onnx`). The export checks itself against PyTorch before the file appears.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnlab import __version__, files, models
from cnnlab.data.dataset import Normalization
from cnnlab.deploy.predictors import METADATA_PREFIX, OnnxPredictor
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


def export_onnx(run_dir: str | Path, out: str | Path | None = None, data_path: str | None = None,
                check_images: int = 256, tolerance: float = TOLERANCE) -> dict:
    """Write RUN_DIR/model.onnx (or `out`) after checking it against PyTorch on `check_images` test images.

    Returns the path, the largest probability difference seen, and the time taken. If the check fails,
    nothing is written.
    """
    try:
        import onnx
    except ImportError:
        raise CnnlabError("ONNX export needs onnx and onnxscript: pip install 'cnnlab[deploy]'") from None
    start = time.perf_counter()
    run = Run.of(run_dir)
    module, meta = deploy_module(run)
    config = run.config()
    images = run_dataset(run, meta, data_path, config).x_test[:check_images].permute(0, 2, 3, 1).contiguous()
    if len(images) == 0:
        raise CnnlabError("the run's test set is empty: nothing to check the export against; pass --data")
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
    onnx.helper.set_model_props(proto, _metadata(run, meta, config))
    proto.doc_string = f"cnnlab {__version__} export of {run.path.name}: uint8 NHWC images -> class probabilities"

    out = Path(out) if out else run.file(Run.ONNX)
    with files.atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())
        with torch.no_grad():
            expected = np.concatenate([t.numpy().reshape(len(images), -1) for t in module(images)], 1)
        got = np.concatenate([a.reshape(len(images), -1) for a in OnnxPredictor(tmp).predict(images.numpy())], 1)
        diff = float(np.abs(got - expected).max())
        if not diff <= tolerance:  # also catches NaN
            raise CnnlabError(f"export check failed: onnxruntime and PyTorch differ by {diff:.2e} "
                              f"(allowed {tolerance:.0e}) on {len(images)} test images; nothing was written")
    return {"path": str(out), "max_abs_diff": diff, "checked_images": len(images),
            "seconds": round(time.perf_counter() - start, 2)}
