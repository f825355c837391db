"""What a CUDA GPU changes, tested where no GPU is (issue 29): the precision chosen from the compute capability
(mocked through torch.cuda's public functions), and benchmarks/gpu_check.py's CPU-safe parts with --dry-run.
The distributed backend's choice is in test_dist.py, the batched optimizer's in test_engine.py."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab import device
from cnnlab.training.loop import Hook
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
    """`quick`, evaluate and the ONNX export, `photos` streamed, the sync-debug runs and the step profile, in smoke
    settings on the CPU: each training's figures, evaluate and the export agreeing with training's test
    accuracy. (Its doctor and Ctrl-C checks run commands tested in test_threads.py and test_train.py; left out
    here for the suite's time: they passed with --dry-run at 836a30a, the Ctrl-C check's 4-epoch form at
    88d632a.)"""
    data = write_image_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=40, size=(32, 32))
    reference = tmp_path / "gpu_check-cpu.json"  # (what a --device cpu run writes, reduced to what is read)
    reference.write_text(json.dumps({"checks": {"quick": {"test_accuracy": 0.42}}}))

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--device", "cpu", "--data",
                               str(data), "--work", str(tmp_path / "work"), "--cpu-reference", str(reference), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    proc = check("--only", "quick", "evaluate_and_export", "photos_streamed", "sync_debug", "step_profile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    checks = out["checks"]
    assert out["dry_run"] and out["device"] == "cpu" and "fast" not in checks and "doctor" not in checks
    quick = checks["quick"]
    assert quick["epochs"] == 1 and quick["train_images"] == 120 and quick["images_per_s"] > 0
    assert 0 <= quick["test_accuracy"] <= 1 and (quick["cpu_test_accuracy"], quick["cpu_reference"]) == (0.42, "quick")
    agree = checks["evaluate_and_export"]
    assert abs(agree["evaluate"] - agree["training"]) < 1e-4 and abs(agree["onnx"] - agree["training"]) < 0.02
    photos, synced = checks["photos_streamed"], checks["sync_debug"]
    assert photos["streamed"] and photos["train_images"] == 120 and photos["cap_fraction"] == 0.0  # (no cap on a CPU)
    assert synced["fast"]["epochs"] == synced["quick"]["epochs"] == 1 and not synced["mode_set"]
    profiled = checks["step_profile"]  # (autocast's casts to bf16 and back: more than fp32's own copies)
    assert set(profiled) == {"bf16", "fp32"} and profiled["bf16"]["casts_per_step"] > profiled["fp32"]["casts_per_step"]
    assert all(p["ms_per_step"] > 0 and p["aten_calls_per_step"] > 0 and p["top_ms_per_step"]
               for p in profiled.values())
    cut = check("--only", "fast", "quick", "--max-seconds", "0")  # past its time: every check left out, and said
    assert cut.returncode == 1 and all(json.loads(cut.stdout[cut.stdout.index("\n{") + 1:])["checks"][name][
        "error"].startswith("TimeoutError: skipped") for name in ("fast", "quick"))
    bad = check("--tag", "../elsewhere")  # (it names the result file)
    assert bad.returncode == 2 and "--tag '../elsewhere'" in bad.stderr.splitlines()[-1] and "{" not in bad.stdout


def test_the_gpu_pack_holds_the_first_images_of_each_class_in_one_file(tmp_path, real_subset):
    """benchmarks/gpu_pack.py: the first N/10 images of each class of each split, by name, byte for byte, in one
    gzipped tar that unpacks to the folder gpu_run.sh trains on."""
    import tarfile

    out = tmp_path / "packed"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_pack.py", "--source", str(real_subset), "--train", "100",
                           "--test", "20", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(out.with_suffix(".tar.gz")) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    for split, n in (("train", 10), ("test", 2)):
        for c in sorted(p.name for p in (real_subset / split).iterdir()):
            want = sorted((real_subset / split / c).iterdir())[:n]
            got = sorted((tmp_path / "unpacked" / "packed" / split / c).iterdir())
            assert [f.name for f in got] == [f.name for f in want]
            assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, want, strict=True))


def state_after(batches, epoch: int, start: int):
    """The epoch generator's state after `start` steps of `epoch` (what a mid-epoch checkpoint keeps); None at 0."""
    if not start:
        return None
    walk = batches.epoch(epoch)
    for _ in range(start):
        next(walk)
    return batches.rng_state()


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
            rng = state_after(resident, epoch, start)
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


def test_an_epochs_numbers_drawn_at_its_start_give_the_batches_drawn_step_by_step():
    """Batches draws an epoch's augmentation and mixing numbers at its start (to copy them to a GPU at once);
    the batches equal those of drawing at each step from the same generator, as a user calling the pipeline
    and mix.mix batch by batch does: for every random operation, with the last batch smaller, across two
    epochs, from a mid-epoch resume, and for the second of two processes."""
    from cnnlab.data import augment, mix
    from cnnlab.data.dataset import Normalization
    from cnnlab.data.loader import Batches
    from cnnlab.dist import World, shard

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (45, 3, 14, 10), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 3, (45,), generator=gen)
    norm = Normalization.fit(x)
    names = ["seed", "flip-translate-cutout+color-jitter+erasing+mixup+cutmix", "flip-crop+randaugment+cutmix",
             "flip+crop+mixup"]
    for name, world in [(n, World()) for n in names] + [(names[1], World(rank=1, size=2))]:
        batches = Batches(x, y, batch_size=16, seed=5, augment=name, norm=norm, num_classes=3, world=world)
        pipeline, mixing = augment.get(name), augment.mixers(name)
        for epoch, start in ((0, 0), (1, 0), (1, 2)):
            g = torch.Generator().manual_seed(5 * 100_003 + epoch)
            perm = torch.randperm(45, generator=g)
            rng = state_after(batches, epoch, start)
            if start:
                g.set_state(rng)
            for step, xb, yb in batches.epoch(epoch, start, rng):
                idx = shard(world, perm[step * 16:(step + 1) * 16])
                want_x, want_y = pipeline(norm(x[idx]), g, epoch=epoch, idx=idx, norm=norm), y[idx]
                if mixing:
                    want_x, want_y = mix.mix(mixing, want_x, want_y, g, 3)
                assert torch.equal(xb, want_x) and torch.equal(yb, want_y), (name, epoch, step)
                assert torch.equal(batches.rng_state(), g.get_state())
        assert step == 2 and len(xb) == (13 if world.size == 1 else 6)  # the last batch smaller


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
    assert info["device"] == "cuda:0" and info["precision"] == "fp16" and info["precision_why"].startswith("fp16")
    assert doctor.describe_gpu(info["gpu"][0]) == ("Tesla T4 (15.0 GiB, compute capability 7.5, no native bf16: "
                                                   "fp16 with a gradient scaler)")


def test_an_evaluation_batch_on_a_gpu_fits_its_free_memory(monkeypatch):
    """1 GiB free (mocked): 1,000 images of 224 px with a mirrored view (1.2 MB each in float) come down to 55 a
    batch, 32 px images stay at 1,000 (910 with six views); a CPU keeps what it is given."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**34))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    gpu = torch.device("cuda", 0)
    assert device.eval_batch(1000, (3, 224, 224), gpu, views=2) == 2**30 // 16 // (4 * 2 * 3 * 224 * 224) == 55
    assert device.eval_batch(1000, (3, 32, 32), gpu, views=2) == 1000
    assert device.eval_batch(1000, (3, 32, 32), gpu, views=6) == 2**30 // 16 // (4 * 6 * 3 * 32 * 32) == 910
    assert device.eval_batch(1000, (3, 224, 224), torch.device("cpu"), views=2) == 1000


class _Modes(Hook):
    """Where NoHostSync has set the sync-debug mode as each step ran, at each read and at each epoch's end:
    runs before NoHostSync (order 100) at every event."""
    order = 95

    def __init__(self, mode: list):
        self.mode, self.steps, self.reads, self.ends = mode, [], [], []

    def after_step(self, fit) -> None:
        self.steps.append(self.mode[0])

    def after_sync(self, fit, totals) -> None:
        self.reads.append((fit.state.step, self.mode[0]))

    def end_epoch(self, fit) -> None:
        self.ends.append(self.mode[0])


def test_no_host_sync_checks_every_step_and_lets_the_periodic_reads_and_epoch_ends_wait(tmp_path, cifar_python_dir):
    """NoHostSync (the GPU check's hook) with the mode's setter recorded, on a CPU: 40 steps an epoch (120 images of
    batch 3), each run with the mode at "error", also those after a read; the reads after steps 20 and 40 and both
    epochs' ends (validation) with it off; off again after the run."""
    from cnnlab import training
    from cnnlab.config import DataConfig, TrainConfig
    from cnnlab.training.hooks import NoHostSync

    mode = [0]
    seen = _Modes(mode)
    cfg = TrainConfig(epochs=2, batch_size=3, seed=3, threads=1)
    training.train(cfg, DataConfig(path=str(cifar_python_dir), val_split=0.2), out=tmp_path / "run",
                   with_report=False, hooks=[seen, NoHostSync(set_mode=lambda m: mode.__setitem__(0, m))])
    assert seen.steps == ["error"] * 80
    assert seen.reads == [(20, 0), (40, 0)] * 2 and seen.ends == [0, 0] and mode == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py runs it there)")
def test_no_step_on_a_gpu_waits_for_the_host(tmp_path, cifar_python_dir):
    """On a GPU, `fast` and `photos`-style augmentation with mixing train under set_sync_debug_mode("error")."""
    from cnnlab import training
    from cnnlab.config import DataConfig
    from cnnlab.presets import get
    from cnnlab.training.hooks import NoHostSync

    for preset, augment in (("fast", None), ("quick", "flip-crop+color-jitter+erasing+mixup+cutmix")):
        cfg = get(preset)
        cfg = replace(cfg, epochs=2, device="cuda", augment=augment or cfg.augment)
        training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / preset, with_report=False,
                       hooks=[NoHostSync()])


def test_memory_free_to_a_gpu_process_counts_its_cache_and_its_cap(monkeypatch):
    """What `free_memory` says (mocked through torch.cuda's public functions), and what follows from it: 1 GiB
    free on a 16 GiB GPU, 512 MiB more held by PyTorch's cache of which 256 MiB in use: 1.25 GiB; a cap of 1/32
    (512 MiB) leaves 256 MiB. CIFAR-sized uint8 images of 400 MiB stay resident (under half of 1.25 GiB) until
    the cap, when they are streamed; the evaluation batch shrinks with the cap."""
    from cnnlab.data.loader import resident_fits

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: gib // 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gib // 4)
    gpu, images = torch.device("cuda", 0), torch.empty(400 * 2**20 // 3072, 3, 32, 32, dtype=torch.uint8)
    for fraction, free, resident in ((1.0, 5 * gib // 4, True), (1 / 32, gib // 4, False)):
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None, f=fraction: f)
        assert device.free_memory(gpu) == free and resident_fits(images, gpu) == resident
        assert device.eval_batch(1000, (3, 224, 224), gpu) == min(1000, free // 16 // (4 * 3 * 224 * 224))


def test_compile_compiles_once_per_run(tmp_path, cifar_python_dir):
    """`fast` with --compile from a run's weights, its body frozen for the first epoch and its whitening bias
    trained for the next one only, 120 images in batches of 32 (a short last batch of 24): every graph is made
    at the first step of the second epoch (the first that trains the run's parameters) and none after it
    (torch.compile's backend forced to one that counts its calls: the same tracing and guards, no code
    generation); the weights end as without --compile (the whitening bias frozen by its dropped gradient as by
    requires_grad)."""
    from safetensors.torch import load_file

    from cnnlab import training
    from cnnlab.config import DataConfig
    from cnnlab.presets import get

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(len(example_inputs))
        return gm.forward

    class Watch(Hook):
        after_steps = []

        def after_step(self, fit) -> None:
            self.after_steps.append((fit.state.epoch, len(graphs)))

    cfg = replace(get("fast"), epochs=1, batch_size=32, threads=1, tta=0)
    data = DataConfig(path=str(cifar_python_dir), val_split=0.2)
    base = training.train(cfg, data, out=tmp_path / "base", with_report=False)  # weights for a frozen body
    cfg = replace(cfg, epochs=3, init_from=str(base), freeze_epochs=1, whiten_bias_epochs=2)
    with torch.compiler.set_stance("default", force_backend=counting):
        training.train(replace(cfg, compile=True), data, out=tmp_path / "compiled", with_report=False,
                       hooks=[Watch()])
    made = {epoch: {n for e, n in Watch.after_steps if e == epoch} for epoch in range(3)}
    assert len(Watch.after_steps) == 12 and made[0] == {0} and made[1] == made[2] == {len(graphs)} and graphs
    training.train(cfg, data, out=tmp_path / "eager", with_report=False)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("compiled", "eager"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_airbench_global_max_pool_is_adaptive_max_pool_and_compiles_to_finite_gradients():
    """airbench's global max-pool gives nn.AdaptiveMaxPool2d(1)'s values and gradients (ties included: one
    element of each takes the gradient), and under torch.compile (inductor, the real backend) with bf16
    autocast a step's gradients stay finite. Its first plain-reduction form, `amax`, split a tie's gradient and
    compiled to NaN gradients from the first step (found when the H200 run's `fast --compile` stopped at step
    2; here the same on the CPU)."""
    from cnnlab.models.networks import GlobalMaxPool

    torch.manual_seed(0)
    x = torch.randn(64, 32, 4, 4).round(decimals=1).requires_grad_()  # one decimal: many ties
    want = nn.AdaptiveMaxPool2d(1)(x).flatten(1)
    got = GlobalMaxPool()(x)
    assert torch.equal(got, want)
    assert torch.equal(*(torch.autograd.grad(y.square().sum(), x)[0] for y in (got, want)))
    block = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.BatchNorm2d(32), nn.GELU(), nn.MaxPool2d(2),
                          GlobalMaxPool(), nn.Linear(32, 10, bias=False)).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", torch.bfloat16):
        out = torch.compile(block, dynamic=False)(torch.randn(64, 8, 8, 8).contiguous(
            memory_format=torch.channels_last))
    out.float().logsumexp(1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters() if p.grad is not None)
