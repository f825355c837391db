"""CIFAR-100 and MNIST-style IDX files in their official layouts, --class-names, and --val-split."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch

from cnnlab import cli, data, models, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.data import idx
from cnnlab.data.dataset import Normalization
from cnnlab.device import pick_precision
from cnnlab.errors import CnnlabError
from cnnlab.evaluation import evaluate
from conftest import make_tar_gz, write_image_folder

FINE = [f"fine{i:02d}" for i in range(100)]
COARSE = [f"coarse{i:02d}" for i in range(20)]


def write_cifar100(folder, n_train=200, n_test=100, seed=0):
    """The official `cifar-100-python/` layout: `train`, `test`, `meta` pickles with bytes keys."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in np.arange(n) % 100]
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        batch = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                 b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": x}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        arrays[name] = (x, fine)
    meta = {b"fine_label_names": [c.encode() for c in FINE], b"coarse_label_names": [c.encode() for c in COARSE]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, arrays


def test_cifar100_fine_and_coarse_from_folder_and_archive(tmp_path):
    folder, arrays = write_cifar100(tmp_path / "cifar-100-python")
    archive = make_tar_gz(folder, tmp_path / "cifar-100-python.tar.gz")
    for path in (folder, archive, tmp_path):  # the folder, the archive, and a folder holding the folder
        ds = data.load_dataset(path)
        assert ds.format == "cifar100-python" and ds.classes == FINE and ds.split == "official test set"
        assert len(ds.y_train) == 200 and len(ds.y_test) == 100
        assert torch.equal(ds.x_train[7].flatten(), torch.from_numpy(arrays["train"][0][7]))  # channel-major rows
        assert ds.y_train[:3].tolist() == [0, 1, 2]
    coarse = data.load_dataset(archive, label_mode="coarse")
    assert coarse.classes == COARSE and coarse.y_train[:12].tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert data.load_dataset(archive).classes == FINE  # the coarse cache entry does not shadow the fine one
    with pytest.raises(CnnlabError, match="unknown label mode"):
        data.load_dataset(folder, label_mode="medium", use_cache=False)


def test_incomplete_cifar100_is_named(tmp_path):
    folder, _ = write_cifar100(tmp_path / "cifar-100-python")
    (folder / "test").unlink()
    (folder / "test.bak").write_bytes(b"")
    with pytest.raises(CnnlabError, match="missing test .*CIFAR-100"):
        data.load_dataset(make_tar_gz(folder, tmp_path / "cifar-100-python.tar.gz"))


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(folder, n_train=40, n_test=20, compress=True, size=28, seed=0):
    """The four official files, gzipped as distributed (or not)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    parts = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        x[:, :4, :4] = y[:, None, None] * 25  # a learnable mark: the corner's brightness says the class
        parts[prefix] = (x, y)
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}-idx{dims}-ubyte"
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
    return folder, parts


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_files(tmp_path, compress):
    folder, parts = write_idx(tmp_path / "mnist", compress=compress)
    ds = data.load_dataset(folder)
    assert ds.format == "idx" and ds.classes == idx.MNIST_CLASSES and ds.channels == 1
    assert ds.image_size == (28, 28) and len(ds.y_train) == 40 and len(ds.y_test) == 20
    assert torch.equal(ds.x_test[3, 0], torch.from_numpy(parts["t10k"][0][3]))
    assert ds.y_test.tolist() == parts["t10k"][1].tolist()


def test_fashion_mnist_names_and_overrides(tmp_path, capsys):
    folder, _ = write_idx(tmp_path / "fashion-mnist")
    assert data.load_dataset(folder).classes[:2] == ["T-shirt/top", "Trouser"]
    names = [f"k{i}" for i in range(10)]
    assert data.load_dataset(folder, class_names=names).classes == names
    with pytest.raises(CnnlabError, match="gives 2 names, but .* has 10 classes"):
        data.load_dataset(folder, class_names=["a", "b"])
    assert cli.main(["data", "info", "--data", str(folder), "--class-names", ",".join(names)]) == 0
    out = capsys.readouterr().out
    assert "format:      idx" in out and "k9" in out and "1 channel" in out


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:7] + b"\x7f" + raw[8:], "header says"),  # 127 images announced, 40 present
    (lambda raw: b"\x00\x00\x0d\x03" + raw[4:], "not an IDX file of unsigned bytes"),  # float type code
    (lambda raw: raw[:-5], "header says"),  # truncated
    (lambda raw: b"", "not an IDX file"),
])
def test_damaged_idx_files_are_named(tmp_path, damage, message):
    folder, _ = write_idx(tmp_path / "mnist", compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CnnlabError, match=message) as info:
        data.load_dataset(folder, use_cache=False)
    assert "train-images-idx3-ubyte" in str(info.value)


def test_idx_labels_count_must_match(tmp_path):
    folder, _ = write_idx(tmp_path / "mnist", compress=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(CnnlabError, match="20 images but its labels file has 7"):
        data.load_dataset(folder, use_cache=False)


def test_idx_data_at_another_image_size(tmp_path):
    folder, _ = write_idx(tmp_path / "mnist", n_train=20, n_test=10)
    ds = data.load_dataset(folder, image_size=(14, 14))
    assert ds.x_train.shape == (20, 1, 14, 14) and ds.x_test.shape == (10, 1, 14, 14)
    full = data.load_dataset(folder)
    # at the same aspect each output pixel is an antialiased mean around its 2x2 block of the original
    blocks = full.x_train.float().view(20, 1, 14, 2, 14, 2).mean((3, 5))
    assert np.corrcoef(ds.x_train.flatten().numpy(), blocks.flatten().numpy())[0, 1] > 0.6


def test_data_info_reports_the_size_asked_for(tmp_path, capsys):
    """`cnnlab data info --data IDX_DIR --image-size 64` once reported the files' 28x28."""
    from cnnlab import cli

    folder, _ = write_idx(tmp_path / "mnist", n_train=20, n_test=10)
    assert cli.main(["data", "info", "--data", str(folder), "--image-size", "64"]) == 0
    assert "image size:  64x64 (crop), 1 channel" in capsys.readouterr().out


def test_training_on_idx_data_keeps_one_channel(tmp_path):
    folder, _ = write_idx(tmp_path / "mnist", n_train=60)
    run = training.train(TrainConfig(epochs=1, batch_size=16), DataConfig(path=str(folder)), out=tmp_path / "run",
                      with_report=False)
    meta = json.loads((run / "model.json").read_text())
    assert meta["in_channels"] == 1 and meta["image_size"] == [28, 28] and meta["classes"] == idx.MNIST_CLASSES


def test_hold_out_is_stratified_disjoint_and_seeded():
    y = torch.arange(100) % 4
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    ds = data.Dataset(x, y, x[:8], y[:8], list("abcd"), "image-folder", "mem", "test/ folder")
    held = ds.hold_out(0.2, seed=3)
    assert len(held.y_val) == 20 and torch.bincount(held.y_val).tolist() == [5, 5, 5, 5]
    assert len(held.y_train) == 80
    assert not set(held.x_val.flatten().tolist()) & set(held.x_train.flatten().tolist())
    assert torch.equal(held.x_val, ds.hold_out(0.2, seed=3).x_val)
    assert not torch.equal(held.x_val, ds.hold_out(0.2, seed=4).x_val)
    assert held.validation[0] is held.x_val and ds.validation[0] is ds.x_test
    with pytest.raises(CnnlabError, match="between 0 and 1"):
        ds.hold_out(1.0, 0)


def test_val_split_validates_on_held_out_training_images(tmp_path, capsys):
    root = write_image_folder(tmp_path / "set", per_class=20, size=(8, 8))  # 60 train, 30 test
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--val-split", "0.25", "--epochs", "1", "--batch-size", "8",
                     "--out", str(out), "--no-report"]) == 0
    config = json.loads((out / "config.json").read_text())["data"]
    assert config["val_split"] == 0.25 and config["train_images"] == 45
    assert config["validation"].startswith("stratified 25% of the training images")
    assert "15 images" in config["validation"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == 30  # the test set is used once, at the end
    history = json.loads((out / "history.json").read_text())
    model, meta = models.load_model(out)
    held = data.load_dataset(root).hold_out(0.25, seed=0)
    cpu, norm = torch.device("cpu"), Normalization.from_dict(meta["normalization"])
    loss, acc = evaluate.loss_and_accuracy(model, held.x_val, held.y_val, norm, cpu, pick_precision("auto", cpu))
    assert history[0]["val_acc"] == pytest.approx(acc) and history[0]["val_loss"] == pytest.approx(loss, rel=1e-4)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--data", str(root), "--val-split", "1.5"])
    assert exit_info.value.code == 2 and "must be above 0 to below 1" in capsys.readouterr().err


def test_idx_header_whose_size_overflows_64_bits_is_refused(tmp_path):
    import struct

    from cnnlab.data import idx
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 65536, 16777216, 16777216))  # 2**64 pixels, no data
    with pytest.raises(CnnlabError, match="more than cnnlab reads"):
        idx.read_idx(path, 3)


def test_an_idx_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    """A few KB of gzip that would inflate to 200 MB behind a header declaring 10 images of 28x28."""
    import gzip
    import struct
    import tracemalloc

    from cnnlab.data import idx
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 10, 28, 28))
        for _ in range(200):
            f.write(bytes(2**20))
    assert path.stat().st_size < 500_000
    tracemalloc.start()
    try:
        with pytest.raises(CnnlabError, match="has more data than its header says"):
            idx.read_idx(path, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:  # left running, it traces every allocation of every later test: the suite ran 300 s longer
        tracemalloc.stop()
    assert peak < 2**20  # never more than the declared size held


def test_labels_that_are_not_class_indices_are_refused_at_load_time(tmp_path, cifar_batches):
    from conftest import write_cifar_python
    for bad in (100_000, -1, 2**40):
        batches = [(x, list(y)) for x, y in cifar_batches]
        batches[-1][1][3] = bad  # one test-set label
        folder = write_cifar_python(tmp_path / f"c{bad}", batches)
        with pytest.raises(CnnlabError, match=f"test label {bad} is not a class index"):
            data.load_dataset(folder, use_cache=False)
    mnist, _ = write_idx(tmp_path / "mnist", compress=False)
    (mnist / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(40, 200, np.uint8)))
    with pytest.raises(CnnlabError, match="training label 200 is not a class index"):
        data.load_dataset(mnist, use_cache=False)


def test_a_cifar_archive_member_declaring_a_huge_size_is_refused(tmp_path, monkeypatch):
    import io
    import tarfile

    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        payload = bytes(2**20)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    from cnnlab.data import cifar
    monkeypatch.setattr(cifar, "MAX_MEMBER", 2**19)  # a 1 MB member against a 512 KB limit
    with pytest.raises(CnnlabError, match="declares 1,048,576 bytes"):
        data.load_dataset(path, use_cache=False)
