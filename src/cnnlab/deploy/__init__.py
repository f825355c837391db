"""The deploy layer: a trained model used outside training.

    predictors   one `Predictor` interface over an ONNX file (onnxruntime, NumPy and Pillow: no PyTorch) or a
                 run directory; `predict_files`, the run's current export
    openvino     the same interface over an OpenVINO model (or an ONNX file in OpenVINO), imported when needed
    pytorch      the run-directory predictor and an exported model's test metrics (imported only when needed)
    export       a run's weights written as one ONNX file or OpenVINO model, checked against PyTorch
    int8         int8 versions of an export, refused when they lose more than --max-drop points of accuracy
    serve        the web service and its page (static/), with its limits (limits.py); POST /explain maps where
                 the network looked (evaluation/explain.py) for a run directory

It sits beside training, not above it: neither imports the other. Both stand on evaluation, models and data.
The names below are this layer's API; importing them does not import PyTorch.
"""

from cnnlab.deploy.predictors import (  # noqa: F401
    METADATA_PREFIX,
    UNKNOWN,
    OnnxPredictor,
    Predictor,
    Runtime,
    answer,
    current_export,
    decode_for,
    expand_paths,
    is_exported,
    is_onnx,
    is_openvino,
    load_predictor,
    min_confidence_for,
    predict_files,
    self_check,
    top_k,
)
