"""The evaluation layer: what a trained model's predictions say about it.

    evaluate   test-set metrics, the confusion matrix, and `predict_logits`, the one function that turns
               images into logits (with normalization and test-time augmentation) for validation, the final
               evaluation, analysis, calibration and the PyTorch predictor alike
    analysis   fastai-style `Interpretation` of a finished run: top losses, most confused pairs
    report     the self-contained report.html
    plots      matplotlib figures, imported only when a picture is drawn
    calibration  the temperature, the confidence that an answer is right, the threshold for "unknown"
    explain    Grad-CAM heatmaps (captum) of where the network looked, and `cnnlab explain`

It stands on models and data and knows nothing of training: training calls it to validate and to write a
run's end, deploy calls it for metrics of an exported file.
"""
