"""How fast and how small a trained model deploys on this CPU: PyTorch eager, ONNX Runtime and OpenVINO, fp32 and int8.

    .venv/bin/python benchmarks/deploy_speed.py                  # trains what it needs (about 25 minutes)
    .venv/bin/python benchmarks/deploy_speed.py --run quick=DIR --run fast=DIR --run mobilenet_v3_large=DIR ...

Models: `quick` and `fast` (32 px, trained on the CIFAR-10 JPEG copy, tested on its 10,000 test images) and
`mobilenet_v3_large`, `resnet18_imagenet` at 224 px (`--preset photos --image-size 224x224`, trained from scratch
on a photo-like folder made from CIFAR-10, as benchmarks/photos.py makes it: this machine reaches no ImageNet
weights, so these runs are weak classifiers; what matters here is their speed, and what int8 does to the same
network's accuracy). Each run is exported by `cnnlab export` four ways (ONNX fp32 and int8, OpenVINO fp32 and int8).

Per model, runtime and precision: batch-1 latency (median and p99 over single-image calls) and batch-64
throughput, with 1 thread and with all cores; the model file's size; test accuracy. The runtimes are measured in
interleaved rounds (each round visits every runtime in turn), so a machine that gets busier hurts all of them
alike. Accuracies are those already measured on the whole test set: PyTorch's by the run, each runtime's fp32
and int8 by the int8 export's check. Targets (issue "deploy fast"): int8 >= 2x the fp32 ONNX throughput at
<= 1 point accuracy loss for the 224-px backbones; mobilenet_v3_large fp32 batch-1 latency at or below timm's
published 7.4 ms. Writes benchmarks/results/deploy_speed-<cpu class>.json. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cnnlab import deploy
from cnnlab.deploy import export, pytorch
from cnnlab.deploy.openvino import OpenVinoPredictor
from cnnlab.evaluation import evaluate
from common import CNNLAB, DATA, HERE, cpu_class, machine, run, save
from photos import make_folder

WORK = HERE / "work" / "deploy"
RECIPES = {  # model -> (training flags, data)
    "quick": (["--preset", "quick"], "cifar"),
    "fast": (["--preset", "fast"], "cifar"),
    "mobilenet_v3_large": (["--preset", "photos", "--model", "mobilenet_v3_large", "--image-size", "224x224",
                            "--epochs", "3"], "photos"),
    "resnet18_imagenet": (["--preset", "photos", "--model", "resnet18_imagenet", "--image-size", "224x224",
                           "--epochs", "3"], "photos"),
}
PHOTOS = (3000, 1000)  # training and test images of the photo-like folder


def trained(name: str, given: dict[str, str]) -> Path:
    if name in given:
        return Path(given[name])
    out = WORK / name
    if (out / "metrics.json").exists():
        return out
    flags, source = RECIPES[name]
    data = DATA if source == "cifar" else make_folder(*PHOTOS)
    seconds, code, _ = run([*CNNLAB, "train", "--data", str(data), *flags, "--out", str(out)], WORK / f"{name}.log")
    if code != 0:
        raise SystemExit(f"training {name} failed (exit {code}); see {WORK / f'{name}.log'}")
    print(f"trained {name} in {seconds:.0f} s")
    return out


def exports(run_dir: Path) -> dict[tuple[str, str], Path]:
    """(runtime, precision) -> the exported model, exported once (the export's own checks run here)."""
    paths = {("onnxruntime", "fp32"): run_dir / "model.onnx", ("onnxruntime", "int8"): run_dir / "model.int8.onnx",
             ("openvino", "fp32"): run_dir / "openvino", ("openvino", "int8"): run_dir / "openvino-int8"}
    for (runtime, precision), path in paths.items():
        if not path.exists():
            # a generous --max-drop: the benchmark reports the loss; the default refusal is tested elsewhere
            result = export.export(run_dir, path, fmt="onnx" if runtime == "onnxruntime" else "openvino",
                                   int8=precision == "int8", max_drop=100)
            print(export.describe(result))
    return paths


def size_mb(path: Path) -> float:
    files = [p for p in path.iterdir()] if path.is_dir() else [path]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)


def predictor(runtime: str, path: Path, threads: int):
    if runtime == "pytorch":
        torch.set_num_threads(threads)
        return pytorch.TorchPredictor(path, "cpu")
    if runtime == "onnxruntime":
        return deploy.OnnxPredictor(path, threads=threads)
    return OpenVinoPredictor(path, threads=threads)


def time_calls(model, batches: list[np.ndarray], seconds: float, at_least: int) -> list[float]:
    """Milliseconds per call, cycling through `batches` for about `seconds` and `at_least` calls, after warm-up."""
    for b in batches[:2]:
        model.predict(b)
    times, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds or len(times) < at_least:
        t = time.perf_counter()
        model.predict(batches[i % len(batches)])
        times.append(1000 * (time.perf_counter() - t))
        i += 1
    return times


def accuracies(run_dir: Path, paths: dict[tuple[str, str], Path]) -> dict[tuple[str, str], float]:
    """Test accuracy of each (runtime, precision), as measured already: PyTorch's by the run (metrics.json), each
    runtime's fp32 and int8 by the int8 export's own check (the same runtime, the whole test set)."""
    result = {("pytorch", p): json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
              for p in ("fp32", "bf16")}
    for runtime in ("onnxruntime", "openvino"):
        record = predictor(runtime, paths[(runtime, "int8")], 0).info["int8"]
        result[(runtime, "fp32")], result[(runtime, "int8")] = record["fp32_accuracy"], record["int8_accuracy"]
    return result


def measure(name: str, run_dir: Path, rounds: int, seconds: float) -> list[dict]:
    dataset = evaluate.run_dataset(run_dir, json.loads((run_dir / "model.json").read_text()))
    x = dataset.x_test[:256].permute(0, 2, 3, 1).contiguous().numpy()
    singles = [x[i:i + 1] for i in range(32)]
    sixty_fours = [x[i:i + 64] for i in range(0, 256, 64)]
    models = {("pytorch", "fp32" if json.loads((run_dir / "model.json").read_text()).get("precision") == "fp32"
               else "bf16"): run_dir, **exports(run_dir)}
    accuracy = accuracies(run_dir, models)
    cores = os.cpu_count() or 1
    samples: dict[tuple, dict[str, list]] = {}
    for _ in range(rounds):  # interleaved: every runtime once per round
        for (runtime, precision), path in models.items():
            for threads in sorted({1, cores}):
                model = predictor(runtime, path, threads)
                s = samples.setdefault((runtime, precision, threads), {"b1": [], "b64": []})
                s["b1"] += time_calls(model, singles, seconds, 20)
                s["b64"] += time_calls(model, sixty_fours, seconds, 3)
                del model
    rows = []
    for (runtime, precision, threads), s in samples.items():
        path = models[(runtime, precision)]
        acc = accuracy[(runtime, precision)]
        size = size_mb(path / "model.safetensors") if runtime == "pytorch" else size_mb(path)
        for batch, key in ((1, "b1"), (64, "b64")):
            ms = s[key]
            rows.append({"model": name, "runtime": runtime, "precision": precision, "batch": batch,
                         "threads": threads, "images_per_s": round(1000 * batch / statistics.median(ms), 1),
                         "latency_ms_median": round(statistics.median(ms), 3),
                         "latency_ms_p99": round(float(np.percentile(ms, 99)), 3), "calls": len(ms),
                         "accuracy": round(acc, 4), "test_images": len(dataset.y_test), "size_mb": size})
        print(f"{name:20s} {runtime:12s} {precision:5s} threads {threads}: batch 1 "
              f"{statistics.median(s['b1']):7.2f} ms (p99 {np.percentile(s['b1'], 99):7.2f}), batch 64 "
              f"{64000 / statistics.median(s['b64']):8.1f} img/s, accuracy {acc:.4f}, {rows[-1]['size_mb']} MB")
    return rows


def without_tta(run_dir: Path, rounds: int, seconds: float) -> list[dict]:
    """Batch-1 latency of the run's network without test-time augmentation (the photos recipe averages a mirrored
    view, two images a call), in fp32: the figure to hold against timm's, which runs one view."""
    import shutil

    copy = WORK / f"{run_dir.name}-without-tta"
    if not copy.exists():
        copy.mkdir(parents=True)
        for name in ("model.json", "model.safetensors", "config.json", "metrics.json", "history.json"):
            shutil.copy(run_dir / name, copy / name)
        meta = json.loads((copy / "model.json").read_text())
        (copy / "model.json").write_text(json.dumps({**meta, "tta": 0}))
    paths = {("onnxruntime", "fp32"): copy / "model.onnx", ("openvino", "fp32"): copy / "openvino"}
    for (runtime, _), path in paths.items():
        if not path.exists():
            print(export.describe(export.export(copy, path, fmt="onnx" if runtime == "onnxruntime" else "openvino")))
    dataset = evaluate.run_dataset(copy, json.loads((copy / "model.json").read_text()))
    singles = [dataset.x_test[i:i + 1].permute(0, 2, 3, 1).contiguous().numpy() for i in range(32)]
    times: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for (runtime, _), path in paths.items():
            for threads in sorted({1, os.cpu_count() or 1}):
                times.setdefault((runtime, threads), []).extend(
                    time_calls(predictor(runtime, path, threads), singles, seconds, 20))
    rows = [{"model": run_dir.name, "tta": 0, "runtime": runtime, "precision": "fp32", "batch": 1, "threads": threads,
             "latency_ms_median": round(statistics.median(ms), 3),
             "latency_ms_p99": round(float(np.percentile(ms, 99)), 3), "calls": len(ms)}
            for (runtime, threads), ms in times.items()]
    for r in rows:
        print(f"{r['model']} without TTA, {r['runtime']} threads {r['threads']}: batch 1 {r['latency_ms_median']} ms "
              f"(p99 {r['latency_ms_p99']})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--run", action="append", default=[], metavar="MODEL=RUN_DIR", help="use a trained run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement and round")
    parser.add_argument("--without-tta-only", action="store_true",
                        help="add only the batch-1 latency without test-time augmentation to the saved results")
    args = parser.parse_args()
    if args.without_tta_only:
        path = HERE / "results" / f"deploy_speed-{cpu_class()}.json"
        result = json.loads(path.read_text())
        result["without_tta"] = without_tta(Path(result["runs"]["mobilenet_v3_large"]), args.rounds, args.seconds)
        save(f"deploy_speed-{cpu_class()}", result)
        return
    given = dict(item.split("=", 1) for item in args.run)
    runs = {name: trained(name, given) for name in args.models}
    rows = []
    for name, run_dir in runs.items():
        rows += measure(name, run_dir, args.rounds, args.seconds)
    without = without_tta(runs["mobilenet_v3_large"], args.rounds, args.seconds) if "mobilenet_v3_large" in runs else []
    result = {"cpu_class": cpu_class(), "machine": machine(), "rows": rows, "without_tta": without,
              "runs": {name: str(path) for name, path in runs.items()},
              "command": "python benchmarks/deploy_speed.py " + " ".join(sys.argv[1:])}
    save(f"deploy_speed-{cpu_class()}", result)


if __name__ == "__main__":
    main()
