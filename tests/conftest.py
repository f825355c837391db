"""Shared fixtures: an isolated cache and home, fake CIFAR-10 sets in the official layouts, image folders,
and a small real subset of ../shared/data/cifar10-jpeg."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.hardware import usable_cores
from cnnlab.training import loop
from cnnlab.training.loop import Hook

# The JPEG copy of CIFAR-10 that developers and CI have beside the project; override with $CNNLAB_TEST_DATA.
SHARED_JPEG = Path(os.environ.get("CNNLAB_TEST_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's real cache, ~/.keras, or $CNNLAB_DATA."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CNNLAB_CACHE", str(home / ".cache" / "cnnlab"))
    monkeypatch.delenv("CNNLAB_DATA", raising=False)
    # One fixed thread count for every test, in this process and in the processes it starts: another count
    # adds partial sums in another order (threads.py), so runs compared bit for bit, or within rounding, must
    # share it, whatever an earlier test did and however busy the machine is (the governor, which would follow
    # the load, is off). tests/test_threads.py turns the governor back on where it is the subject.
    import torch

    monkeypatch.setenv("CNNLAB_THREADS", "keep")
    monkeypatch.setenv("OMP_NUM_THREADS", str(TEST_THREADS))
    torch.set_num_threads(TEST_THREADS)
    yield home
    import tracemalloc

    # a test that leaves tracemalloc running slows every later one (Python allocations traced: the ONNX
    # exports of tests/test_transfer.py took 3-5x as long), so it fails here, named
    assert not tracemalloc.is_tracing(), "this test left tracemalloc running"


TEST_THREADS = min(2, usable_cores())


def fake_cifar_arrays(per_batch: int = 30, seed: int = 0):
    """Five training batches and a test batch of random 32x32 images with labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.permutation(np.arange(per_batch) % 10)]
        batches.append((x, y))
    return batches


def write_cifar_python(folder: Path, batches) -> Path:
    """The official `cifar-10-batches-py/` layout: Python-2-style pickles with bytes keys."""
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, (x, y) in zip(names, batches, strict=True):
        batch = {b"batch_label": name.encode(), b"labels": y, b"data": x,
                 b"filenames": [f"img_{i}.png".encode() for i in range(len(y))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"num_cases_per_batch": len(batches[0][1]), b"label_names": [c.encode() for c in CLASSES],
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "readme.html").write_text("<html></html>")
    return folder


def write_cifar_binary(folder: Path, batches) -> Path:
    """The official `cifar-10-batches-bin/` layout: 3073-byte records, label byte first."""
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name, (x, y) in zip(names, batches, strict=True):
        records = np.concatenate([np.array(y, dtype=np.uint8)[:, None], x], axis=1)
        records.tofile(folder / name)
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return folder


def make_tar_gz(src_dir: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_dir, arcname=src_dir.name)
    return archive


@pytest.fixture(scope="session")
def cifar_batches():
    return fake_cifar_arrays()


@pytest.fixture(scope="session")
def cifar_python_dir(tmp_path_factory, cifar_batches) -> Path:
    return write_cifar_python(tmp_path_factory.mktemp("py") / "cifar-10-batches-py", cifar_batches)


@pytest.fixture(scope="session")
def cifar_tar(tmp_path_factory, cifar_python_dir) -> Path:
    return make_tar_gz(cifar_python_dir, tmp_path_factory.mktemp("tar") / "cifar-10-python.tar.gz")


@pytest.fixture(scope="session")
def cifar_binary_dir(tmp_path_factory, cifar_batches) -> Path:
    return write_cifar_binary(tmp_path_factory.mktemp("bin") / "cifar-10-batches-bin", cifar_batches)


def write_image_folder(root: Path, classes=("a", "b", "c"), per_class=6, size=(12, 10), mode="RGB",
                       test=True, ext=".png") -> Path:
    """Class-coloured images: class k is brightest in channel k % 3, so a model can learn it."""
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("test", max(1, per_class // 2))) if test else (("train", per_class),):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 60, size=(size[0], size[1], 3), dtype=np.uint8)
                arr[:, :, k % 3] += 180
                im = Image.fromarray(arr)
                if mode == "L":
                    im = im.convert("L")
                im.save(d / f"{i:03d}{ext}")
    return root


@pytest.fixture(scope="session")
def real_subset(tmp_path_factory) -> Path:
    """500 training and 100 test images per class copied from the JPEG copy of CIFAR-10."""
    if not SHARED_JPEG.is_dir():
        pytest.skip(f"real CIFAR-10 data not found at {SHARED_JPEG}")
    root = tmp_path_factory.mktemp("real") / "cifar10-subset"
    for split, n in (("train", 500), ("test", 100)):
        for c in CLASSES:
            dest = root / split / c
            dest.mkdir(parents=True)
            for f in sorted((SHARED_JPEG / split / c).iterdir())[:n]:
                shutil.copy(f, dest / f.name)
    return root


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, real_subset) -> Path:
    """The `quick` recipe (airbench-s: whitening, BatchNorm, GELU, flip+shift test-time augmentation),
    three epochs on the real subset with a tenth of it held out for validation (and calibration): a small but
    complete model to export, explain and serve."""
    from cnnlab import presets, training
    from cnnlab.config import DataConfig, override

    out = tmp_path_factory.mktemp("runs") / "quick"
    training.train(override(presets.get("quick"), epochs=3), DataConfig(path=str(real_subset), val_split=0.1),
                   preset="quick", out=out, with_report=False)
    return out


@pytest.fixture(scope="session")
def quick_onnx(tmp_path_factory, quick_run) -> Path:
    from cnnlab.deploy import export

    return Path(export.export_onnx(quick_run, tmp_path_factory.mktemp("onnx") / "quick.onnx")["path"])


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="Debian's chromium is not installed (apt-get install chromium)")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def launch_chromium(playwright):
    """Debian's headless chromium (Playwright's own download does not work offline), quiet and sandbox-free."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"])


class CtrlCAt(Hook):
    """Asks training to stop after the n-th step of the run it is given to, as Ctrl-C does (the SIGINT handler
    sets loop.STOP): the loop checkpoints and raises Interrupted."""

    def __init__(self, n: int):
        self.n, self.steps = n, 0

    def after_step(self, fit) -> None:
        self.steps += 1
        if self.steps == self.n:
            loop.STOP.set()


class Fault(Hook):
    """Raises `error` at the loop's `event` (a fault injected through the loop's public seam). `order` places it
    among the default hooks (training/hooks.py): e.g. 35, after the history is written and before the
    checkpoint."""

    def __init__(self, event: str, error: BaseException, order: int = 100):
        self.order, self.error = order, error
        setattr(self, event, self.fail)

    def fail(self, fit, *args) -> None:
        raise self.error


@pytest.fixture
def registered():
    """Models a test registers are taken out of the registry after it."""
    from cnnlab import models

    before = set(models.MODELS)
    yield models
    for name in set(models.MODELS) - before:
        del models.MODELS[name]
