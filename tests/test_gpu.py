"""What a CUDA GPU changes, tested where no GPU is (issue 29): the precision chosen from the compute capability
(mocked through torch.cuda's public functions), and benchmarks/gpu_check.py's CPU-safe parts with --dry-run.
The distributed backend's choice is in test_dist.py, the batched optimizer's in test_engine.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnnlab import device
from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def test_a_gpu_gets_bf16_only_from_compute_capability_8_and_fp16_with_a_scaler_below(monkeypatch):
    """Mocked capabilities (torch.cuda.get_device_capability): a T4 (7.5) or V100 (7.0), which PyTorch's
    is_bf16_supported() also calls bf16-capable, trains in fp16 with the gradient scaler, and an explicit bf16
    there is pointed out; an A100 (8.0) or H100 (9.0) in bf16. Without a GPU, nothing to configure changes."""
    gpu = torch.device("cuda", 0)
    for capability, want in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                             ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert device.pick_precision("auto", gpu) == want, capability
        warning = device.precision_warning(torch.bfloat16, gpu)
        assert (warning is not None) == (want == torch.float16) and (warning is None or "7." in warning)
        assert device.precision_warning(torch.float16, gpu) is None
    before = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    device.configure(torch.device("cpu"))
    assert (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()) == before == (False, "highest")


def test_the_gpu_check_runs_its_cpu_safe_parts_with_dry_run(tmp_path):
    """doctor, `quick`, Ctrl-C and --resume, evaluate and the ONNX export, in smoke settings on the CPU: each
    training's figures, the resumed run's weights equal to the uninterrupted one's, evaluate and the export
    agreeing with training's test accuracy; the checks that wait for code that is not there say so."""
    data = write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=40, size=(32, 32))
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--device", "cpu", "--data",
                           str(data), "--work", str(tmp_path / "work"), "--only", "doctor", "quick", "ctrl_c_resume",
                           "evaluate_and_export"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    checks = out["checks"]
    assert out["dry_run"] and out["device"] == "cpu" and "fast" not in checks
    assert checks["doctor"]["cpu"]["class"] == out["machine"]["cpu_class"] and checks["doctor"]["gpu"] == []
    quick = checks["quick"]
    assert quick["epochs"] == 1 and quick["train_images"] == 120 and quick["images_per_s"] > 0
    assert 0 <= quick["test_accuracy"] <= 1 and quick["cpu_test_accuracy"] is None
    resumed = checks["ctrl_c_resume"]
    assert resumed["interrupted_exit"] == 130 and resumed["max_weight_difference"] == 0.0
    assert resumed["test_accuracy"][0] == resumed["test_accuracy"][1]
    agree = checks["evaluate_and_export"]
    assert abs(agree["evaluate"] - agree["training"]) < 1e-4 and abs(agree["onnx"] - agree["training"]) < 0.02
    assert "not_run" in checks["photos_streamed"] and "not_run" in checks["sync_debug"]


def test_streamed_batches_are_the_resident_ones_from_any_step_and_on_any_process():
    """Batches(stream=True) gathers each batch on a background thread (on a GPU: pinned, copied ahead on a side
    stream): the same augmented, mixed batches as the resident path, from the start and from a mid-epoch resume,
    for each of two processes' shards; an epoch left early stops its thread, and the thread's error is raised."""
    import threading

    from cnnlab.data import loader
    from cnnlab.data.dataset import Normalization
    from cnnlab.data.loader import Batches
    from cnnlab.dist import World

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (70, 3, 12, 12), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 4, (70,), generator=gen)
    norm = Normalization.fit(x)
    for world in (World(), World(rank=1, size=2)):
        kw = dict(batch_size=16, seed=3, augment="flip-crop+mixup", norm=norm, num_classes=4, world=world)
        resident, streamed = Batches(x, y, **kw), Batches(x, y, **kw, stream=True)
        assert streamed.stream and not resident.stream
        for epoch, start in ((0, 0), (1, 0), (1, 2)):
            rng = None
            if start:
                walk = resident.epoch(epoch)
                for _ in range(start):
                    next(walk)
                rng = resident.rng_state()
            a, b = list(resident.epoch(epoch, start, rng)), list(streamed.epoch(epoch, start, rng))
            assert len(a) == len(b) == resident.steps - start
            assert all(sa == sb and torch.equal(xa, xb) and torch.equal(ya, yb)
                       for (sa, xa, ya), (sb, xb, yb) in zip(a, b, strict=True))
    walk = streamed.epoch(0)
    next(walk)
    walk.close()
    assert not any(t.name == "cnnlab-stream" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(IndexError):  # the thread's error (here an index past the images) reaches the step
        list(loader.streamed(x, [torch.tensor([0]), torch.tensor([999])], torch.device("cpu")))


def test_train_with_stream_reaches_the_same_weights(tmp_path, cifar_python_dir):
    """`cnnlab train --stream` against the same command without it (same seed, --threads 1): the same bytes."""
    from safetensors.torch import load_file

    from cnnlab import cli

    flags = ["train", "--data", str(cifar_python_dir), "--preset", "quick", "--epochs", "2", "--batch-size", "40",
             "--threads", "1", "--seed", "2", "--no-report"]
    assert cli.main([*flags, "--out", str(tmp_path / "resident")]) == 0
    assert cli.main([*flags, "--stream", "--out", str(tmp_path / "streamed")]) == 0
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("resident", "streamed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["train"]["stream"] is True


def test_doctor_names_each_gpu_with_its_memory_capability_and_precision(monkeypatch):
    """A machine with a T4 (mocked through torch.cuda's public functions): doctor gives its name, memory and
    compute capability, and fp16 as the precision, with why."""
    from types import SimpleNamespace

    from cnnlab import doctor

    t4 = SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30, major=7, minor=5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=None: t4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    info = doctor.machine()
    assert info["gpu"] == [{"name": "Tesla T4", "memory_gib": 15.0, "capability": "7.5", "native_bf16": False}]
    assert info["device"] == "cuda" and info["precision"] == "fp16" and info["precision_why"].startswith("fp16")
    assert doctor.describe_gpu(info["gpu"][0]) == ("Tesla T4 (15.0 GiB, compute capability 7.5, no native bf16: "
                                                   "fp16 with a gradient scaler)")


def test_an_evaluation_batch_on_a_gpu_fits_its_free_memory(monkeypatch):
    """1 GiB free (mocked): 1,000 images of 224 px with a mirrored view (1.2 MB each in float) come down to 55 a
    batch, 32 px images stay at 1,000 (910 with six views); a CPU keeps what it is given."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**34))
    gpu = torch.device("cuda", 0)
    assert device.eval_batch(1000, (3, 224, 224), gpu, views=2) == 2**30 // 16 // (4 * 2 * 3 * 224 * 224) == 55
    assert device.eval_batch(1000, (3, 32, 32), gpu, views=2) == 1000
    assert device.eval_batch(1000, (3, 32, 32), gpu, views=6) == 2**30 // 16 // (4 * 6 * 3 * 32 * 32) == 910
    assert device.eval_batch(1000, (3, 224, 224), torch.device("cpu"), views=2) == 1000
