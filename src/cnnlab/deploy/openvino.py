"""OpenVINO: an exported model run by Intel's runtime, and the IR (.xml and .bin) written from the ONNX graph.

`OpenVinoPredictor` runs the IR that `cnnlab export --format openvino` writes, or an exported .onnx file itself
(`--runtime openvino`): OpenVINO's ONNX reader keeps the graph's metadata under "framework", and its converter
carries it into the IR, so both give the same `info` as onnxruntime does. Needs OpenVINO only
(`pip install 'cnnlab[openvino]'`), never PyTorch.

Inference runs in fp32 (`INFERENCE_PRECISION_HINT`): on CPUs with avx512_bf16 OpenVINO would otherwise pick
bf16 on its own, and the probabilities would no longer agree with PyTorch's within export.TOLERANCE. An int8
model computes in int8 either way.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from cnnlab.deploy.predictors import exported_info
from cnnlab.errors import CnnlabError

IR_NAME = "model.xml"  # in the folder `export --format openvino` writes, beside model.bin


def openvino():
    try:
        import openvino as ov
    except ImportError:
        raise CnnlabError("OpenVINO models need OpenVINO: pip install 'cnnlab[openvino]'") from None
    return ov


def model_file(path: str | os.PathLike) -> Path:
    """The file OpenVINO reads: an export folder's model.xml, or the .xml or .onnx file given."""
    path = Path(path)
    file = path / IR_NAME if path.is_dir() else path
    if not file.is_file():
        raise CnnlabError(f"OpenVINO model {file} does not exist")
    if file.suffix.lower() == ".xml" and not file.with_suffix(".bin").is_file():
        raise CnnlabError(f"OpenVINO model {file} has no weights beside it ({file.with_suffix('.bin').name})")
    return file


def metadata(model) -> dict[str, str]:
    """The cnnlab.* metadata an OpenVINO model carries (from the ONNX graph it was converted from)."""
    if not model.has_rt_info(["framework"]):
        return {}
    return {key: model.get_rt_info(["framework", key]).astype(str)
            for key in model.get_rt_info()["framework"].keys() if key.startswith("cnnlab.")}


def set_metadata(model, fields: dict[str, str]) -> None:
    for key, value in fields.items():
        model.set_rt_info(value, ["framework", key])


class OpenVinoPredictor:
    """An exported model (an OpenVINO IR, or an exported .onnx file) in OpenVINO on the CPU."""

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        ov = openvino()
        file = model_file(path)
        core = ov.Core()
        try:
            model = core.read_model(str(file))
        except Exception as e:  # OpenVINO raises its own types for unreadable files
            raise CnnlabError(f"cannot load OpenVINO model {file}: {str(e).strip().splitlines()[0][:300]}") from None
        self.info = exported_info(metadata(model), file, "openvino" if file.suffix.lower() == ".xml" else "onnx")
        self.info["runtime"] = "openvino"
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        self._local = threading.local()  # an infer request per thread: the server predicts from several

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.predict(images)[0]

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        outputs = request.infer({0: np.ascontiguousarray(images, dtype=np.uint8)})
        probs = outputs[self.compiled.output(0)].copy()  # the request's buffers are reused by its next call
        return probs, (outputs[self.compiled.output(1)].copy() if len(self.compiled.outputs) > 1 else probs.max(1))
