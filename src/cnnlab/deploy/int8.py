"""int8 models: post-training static quantization of a checked fp32 export, and the accuracy check that decides
whether it is written at all.

Both formats quantize the network's weights per output channel to int8 and its activations to 8 bits, with the
ranges measured on a seeded sample of training images (`calibration_sample`; never test images). The input
pipeline inside the graph (uint8 -> float, normalization) and the softmax stay in float.
- ONNX: onnxruntime's own quantizer (QDQ format, int8 weights, uint8 activations, ranges from the 99.999th
  percentile of each activation's histogram): it ships with onnxruntime, so `cnnlab[deploy]` needs nothing more.
  The ranges, measured on ResNet-18 at 224 px (benchmarks/deploy_speed.py's run, fp32 36.4% on 1,000 test
  images; AMD EPYC avx512_bf16 with VNNI): percentile 36.8%, min-max 35.1% (refused at the default 1 point),
  entropy 34.1%, symmetric int8 activations 33.8%; percentile took 112 s to quantize against min-max's 24-40.
  On `quick` (CIFAR-10) min-max and percentile both kept fp32's 74.35% within 0.03 points.
- OpenVINO: NNCF's `quantize` on the IR. The same onnxruntime QDQ graph converted by OpenVINO ran those images in
  3.3 s, slower than OpenVINO's own fp32 (2.2 s); NNCF's took 1.1 s at 74.42% (same machine, same day).
`check` then measures the int8 model beside the fp32 one on the whole test set; a larger loss than `max_drop`
points refuses the export, naming both accuracies.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cnnlab.deploy.predictors import METADATA_PREFIX, Predictor
from cnnlab.errors import CnnlabError

CALIBRATION_IMAGES = 300  # NNCF's default subset size; ranges from 512 scored the same on `quick`
CALIBRATION_SEED = 0
MAX_DROP = 1.0  # points of test accuracy an int8 model may lose against fp32 before the export is refused
BATCH = 32  # images per calibration batch: the quantizers hold one batch's activations at a time


def calibration_sample(x_train, n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """`n` training images chosen with a seeded generator, as uint8 (n, H, W, C): what the ranges are measured on."""
    if len(x_train) == 0:
        raise CnnlabError("the run's training set is empty: there are no images to calibrate the int8 ranges on")
    n = min(n, len(x_train))
    index = np.sort(np.random.default_rng(seed).choice(len(x_train), n, replace=False))
    return np.ascontiguousarray(x_train[index].permute(0, 2, 3, 1).numpy())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizers' notes (onnxruntime's on the root logger, per node; NNCF's progress bars on stdout) kept from
    the user: what they say about a graph is not something the user can act on. Errors still raise."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_onnx(src: Path, dst: Path, sample: np.ndarray) -> None:
    """The int8 version of the fp32 ONNX file `src`, written to `dst`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        """The sample in batches of BATCH; `set_range` lets the quantizer measure a few at a time."""

        def __init__(self):
            self.batches = [sample[i:i + BATCH] for i in range(0, len(sample), BATCH)]
            self.set_range(0, len(self.batches))

        def __len__(self):
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int):
            self.pending = iter(self.batches[start_index:end_index])

        def get_next(self):
            batch = next(self.pending, None)
            return None if batch is None else {"images": batch}

    prepared = dst.with_name(dst.name + ".prepared.onnx")
    try:
        # folds batch norms into the convolutions first, so they are quantized as one (symbolic shape inference
        # fails on the exporter's constants and adds nothing for a graph whose shapes are already known)
        with _quiet():
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(dst), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Percentile,
                            # one batch's activations at a time, merged into the histograms after each (onnxruntime
                            # 1.32's CalibMaxIntermediateOutputs drops the batches it clears: "No data is collected")
                            extra_options={"CalibStridedMinMax": 1})
    finally:
        prepared.unlink(missing_ok=True)


def add_metadata(path: Path, fields: dict[str, str]) -> None:
    """`fields` added to (or replacing) the metadata of the ONNX file at `path`."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in proto.metadata_props} | fields)
    path.write_bytes(proto.SerializeToString())


def quantize_openvino(model, sample: np.ndarray):
    """The int8 version of an OpenVINO model (NNCF, its ranges from `sample`)."""
    try:
        import nncf
    except ImportError:
        raise CnnlabError("int8 OpenVINO models need NNCF: pip install 'cnnlab[openvino]'") from None
    batches = [sample[i:i + BATCH] for i in range(0, len(sample), BATCH)]
    with _quiet():
        nncf.set_log_level(logging.ERROR)
        return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), fast_bias_correction=True)


def accuracy(predictor: Predictor, x_test, y_test, batch: int = 256) -> float:
    """Top-1 accuracy of an exported model on uint8 NCHW test images (a tensor, resident or memory-mapped)."""
    right = 0
    for i in range(0, len(y_test), batch):
        images = np.ascontiguousarray(x_test[i:i + batch].permute(0, 2, 3, 1).numpy())
        right += int((predictor.probabilities(images).argmax(1) == y_test[i:i + batch].numpy()).sum())
    return right / len(y_test)


def check(fp32: float, int8: float, test_images: int, max_drop: float) -> None:
    drop = 100 * (fp32 - int8)
    if not drop <= max_drop:
        change = f"{abs(drop):.2f} points {'lower' if drop > 0 else 'higher'}"
        raise CnnlabError(f"the int8 model's test accuracy is {100 * int8:.2f}% against fp32's {100 * fp32:.2f}% on "
                          f"{test_images:,} test images ({change}), and --max-drop {max_drop:g} allows at most "
                          f"{max_drop:g} points lower; nothing was written")


def record(fp32: float, int8: float, test_images: int, calibration_images: int, max_drop: float, method: str
           ) -> dict[str, str]:
    """The metadata an int8 model carries beside the fp32 export's (its test accuracy is its own)."""
    fields = {"precision": "int8", "test_accuracy": int8,
              "int8": {"fp32_accuracy": fp32, "int8_accuracy": int8, "test_images": test_images,
                       "calibration_images": calibration_images, "calibration_seed": CALIBRATION_SEED,
                       "max_drop": max_drop, "method": method}}
    return {METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
