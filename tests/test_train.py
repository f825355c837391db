"""Training: seeded repeatability, resume equality after an interruption, Ctrl-C, and a real-data run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnlab import cli, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.errors import Interrupted
from cnnlab.run import HISTORY_FIELDS, Run
from conftest import CtrlCAt

SMALL = TrainConfig(epochs=2, batch_size=16, augment="seed", seed=7)  # 150 images: 10 steps per epoch
quiet = {}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _history_without_times(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s", "val_seconds")}
            for h in json.loads((run_dir / "history.json").read_text())]


def test_seeded_cpu_run_is_bit_for_bit_repeatable(tmp_path, cifar_python_dir):
    data_cfg = DataConfig(path=str(cifar_python_dir))
    a = training.train(SMALL, data_cfg, out=tmp_path / "a", **quiet)
    b = training.train(SMALL, data_cfg, out=tmp_path / "b", **quiet)
    c = training.train(TrainConfig(**{**SMALL.__dict__, "seed": 8}), data_cfg, out=tmp_path / "c", **quiet)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert _history_without_times(a) == _history_without_times(b)
    assert not _same_weights(a, c)


@pytest.mark.parametrize("stop_at_call", [4, 10, 13])  # mid-epoch 1, end of epoch 1, mid-epoch 2
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, cifar_python_dir, stop_at_call):
    data_cfg = DataConfig(path=str(cifar_python_dir))
    whole = training.train(SMALL, data_cfg, out=tmp_path / "whole", **quiet)

    with pytest.raises(Interrupted, match="--resume"):  # CtrlCAt sets loop.STOP, as the SIGINT handler does
        training.train(SMALL, data_cfg, out=tmp_path / "cut", hooks=[CtrlCAt(stop_at_call)], **quiet)
    cut = tmp_path / "cut"
    assert (cut / Run.CHECKPOINT).is_file() and not (cut / "model.safetensors").exists()
    state = Run(cut).load_checkpoint()
    assert (state["epoch"], state["step"]) == divmod(stop_at_call, 10)
    training.resume(cut, **quiet)
    assert _same_weights(whole, cut)
    assert _history_without_times(whole) == _history_without_times(cut)
    assert json.loads((cut / "metrics.json").read_text())["test_accuracy"] == \
        json.loads((whole / "metrics.json").read_text())["test_accuracy"]


def test_run_directory_contents(tmp_path, cifar_binary_dir):
    run = training.train(TrainConfig(epochs=2, batch_size=32), DataConfig(path=str(cifar_binary_dir)),
                      preset="seed", out=tmp_path / "r", **quiet)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["data"]["format"] == "cifar-binary"
    assert config["environment"]["torch"] == torch.__version__
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == set(HISTORY_FIELDS)
    history = json.loads((run / "history.json").read_text())
    assert all(h["seconds"] > 0 and h["images_per_s"] > 0 and 0 <= h["val_acc"] <= 1 for h in history)
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"] == "seed" and meta["image_size"] == [32, 32] and len(meta["classes"]) == 10
    assert meta["normalization"] == {"mean": [0.0], "std": [1.0]}
    # the tutorial's recipe validates on the test set: calibrated there, its figures cross-fitted on halves
    calibrated = json.loads((run / "metrics.json").read_text())["calibration"]
    assert meta["calibration"]["fitted_on"] == calibrated["fitted_on"] == "test"
    assert len(calibrated["fitted_temperatures"]) == 2 and meta["calibration"]["temperature"] > 0
    assert "cross-fitted" in (run / "report.html").read_text()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written files


def test_ctrl_c_in_a_real_process_saves_a_checkpoint_and_exits_cleanly(tmp_path, cifar_python_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cnnlab.cli", "train", "--data", str(cifar_python_dir), "--epochs", "500",
           "--batch-size", "8", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "history.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"cnnlab train --resume {out}" in stderr
    state = Run(out).load_checkpoint()
    assert 1 <= state["epoch"] < 500
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_short_real_data_run_learns(tmp_path, real_subset, capsys):
    """The tutorial's preset for one epoch on 2,000 real CIFAR-10 images, through the CLI."""
    out = tmp_path / "real"
    assert cli.main(["train", "--data", str(real_subset), "--preset", "seed", "--epochs", "1", "--subset", "2000",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Test accuracy:" in printed and str(out / "confusion_matrix.png") in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == 1000
    assert metrics["test_accuracy"] > 0.2  # chance is 0.1
    assert sum(map(sum, metrics["confusion_matrix"])) == 1000
    assert os.path.getsize(out / "confusion_matrix.png") > 10_000
    history = json.loads((out / "history.json").read_text())
    assert history[0]["val_acc"] == pytest.approx(metrics["test_accuracy"])


def test_half_precision_on_a_cpu_that_emulates_it_is_pointed_out_once(tmp_path, capsys, monkeypatch, cifar_python_dir):
    from cnnlab import device

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda *a: False)  # an AVX2 laptop
    assert cli.main(["train", "--data", str(cifar_python_dir), "--dry-run", "--precision", "bf16", "--no-report",
                     "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.count("no native bf16 arithmetic; PyTorch emulates it") == 1
    assert cli.main(["train", "--data", str(cifar_python_dir), "--dry-run", "--no-report",
                     "--out", str(tmp_path / "auto")]) == 0
    assert "emulates" not in capsys.readouterr().out  # auto chose fp32
