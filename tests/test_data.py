"""Every data layout reads to the same arrays; defaults, download, cache and splits behave as documented."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import data
from cnnlab.data import cifar, decode
from cnnlab.errors import CnnlabError
from conftest import CLASSES, make_tar_gz, write_cifar_python, write_image_folder


def expected(batches):
    x = np.concatenate([b[0] for b in batches[:5]]).reshape(-1, 3, 32, 32)
    y = np.concatenate([b[1] for b in batches[:5]])
    return x, y, batches[5][0].reshape(-1, 3, 32, 32), np.array(batches[5][1])


@pytest.mark.parametrize("fixture,fmt", [("cifar_python_dir", "cifar-python"), ("cifar_tar", "cifar-python"),
                                         ("cifar_binary_dir", "cifar-binary")])
def test_official_layouts_read_exactly(request, cifar_batches, fixture, fmt):
    ds = data.load_dataset(request.getfixturevalue(fixture))
    x, y, xt, yt = expected(cifar_batches)
    assert ds.format == fmt
    assert ds.classes == CLASSES
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert np.array_equal(ds.x_train.numpy(), x) and np.array_equal(ds.y_train.numpy(), y)
    assert np.array_equal(ds.x_test.numpy(), xt) and np.array_equal(ds.y_test.numpy(), yt)
    assert ds.split == "official test set"


def test_parent_folder_of_batches_is_detected(cifar_python_dir):
    fmt, path = data.detect_format(cifar_python_dir.parent)
    assert (fmt, path) == ("cifar-python", cifar_python_dir)


def test_pickle_that_runs_code_is_refused(tmp_path, cifar_batches):
    folder = write_cifar_python(tmp_path / "cifar-10-batches-py", cifar_batches)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(CnnlabError, match="data_batch_3.*refusing to load .*print"):
        data.load_dataset(folder, use_cache=False)


def test_image_folder_rgb_with_test_split(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("zebra", "ant", "cow"), per_class=4, size=(12, 10))
    ds = data.load_dataset(root)
    assert ds.classes == ["ant", "cow", "zebra"]  # sorted folder names
    assert ds.x_train.shape == (12, 3, 12, 10) and ds.x_test.shape == (6, 3, 12, 10)
    assert ds.split == "test/ folder"
    # "zebra" images were made brightest in channel 0, "ant" in channel 1 (see write_image_folder)
    zebra = ds.x_train[ds.y_train == 2].float().mean((0, 2, 3))
    assert zebra.argmax() == 0


def test_image_folder_grayscale_and_mixed_sizes(tmp_path):
    root = write_image_folder(tmp_path / "g", per_class=3, size=(8, 8), mode="L", test=False, ext=".jpg")
    # one odd-sized image is resized to the first image's size
    from PIL import Image
    Image.new("L", (20, 5), 128).save(root / "train" / "b" / "zz.jpg")
    ds = data.load_dataset(root)
    assert ds.channels == 1 and ds.image_size == (8, 8)
    assert len(ds.y_train) + len(ds.y_test) == 10


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    root = write_image_folder(tmp_path / "m", per_class=2, size=(6, 6), mode="L")
    from PIL import Image
    Image.new("RGB", (6, 6), (255, 0, 0)).save(root / "train" / "a" / "rgb.png")
    ds = data.load_dataset(root)
    assert ds.channels == 3
    gray = ds.x_train[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_no_test_folder_gives_seeded_stratified_split(tmp_path):
    root = write_image_folder(tmp_path / "s", classes=("a", "b"), per_class=20, size=(4, 4), test=False)
    one = data.load_dataset(root, val_fraction=0.25, split_seed=3)
    two = data.load_dataset(root, val_fraction=0.25, split_seed=3)
    other = data.load_dataset(root, val_fraction=0.25, split_seed=4)
    assert torch.bincount(one.y_test).tolist() == [5, 5]
    assert torch.bincount(one.y_train).tolist() == [15, 15]
    assert torch.equal(one.x_test, two.x_test) and not torch.equal(one.x_test, other.x_test)
    assert "25%" in one.split and "seed 3" in one.split


def test_subset_is_stratified_and_exact(cifar_python_dir):
    ds = data.load_dataset(cifar_python_dir).subset(50, seed=0)
    assert len(ds.y_train) == 50
    assert torch.bincount(ds.y_train).tolist() == [5] * 10


def test_second_load_comes_from_cache(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "c", per_class=2, size=(5, 5))
    before = decode.decoded()
    first = data.load_dataset(root)
    assert decode.decoded() == before + 9  # 3 classes: 2 training images and 1 test image each
    before = decode.decoded()
    second = data.load_dataset(root)
    assert decode.decoded() == before, "decoded again despite the cache"
    assert torch.equal(first.x_train, second.x_train) and first.classes == second.classes


def test_cache_is_invalidated_when_a_file_changes(tmp_path):
    root = write_image_folder(tmp_path / "c", per_class=2, size=(5, 5))
    before = data.load_dataset(root)
    from PIL import Image
    Image.new("RGB", (5, 5), (1, 2, 3)).save(root / "train" / "a" / "000.png")
    after = data.load_dataset(root)
    assert not torch.equal(before.x_train, after.x_train)
    assert after.x_train[0, :, 0, 0].tolist() == [1, 2, 3]


def test_normalization_unit_and_meanstd():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    assert torch.allclose(data.Normalization()(x), x.float() / 255)
    norm = data.Normalization.fit(x)
    assert norm.mean == pytest.approx((0.5, 0.3))
    assert norm.std == pytest.approx((0.5 ** 0.5, 0.2 / 2 ** 0.5), rel=1e-5)  # unbiased std of two values
    z = norm(x)
    assert torch.allclose(z[0, :, 0], torch.tensor([[-0.7071, 0.7071], [-0.7071, 0.7071]]), atol=1e-4)


def test_default_location_order(isolated_home, cifar_python_dir, cifar_binary_dir, monkeypatch):
    keras = isolated_home / ".keras" / "datasets"
    keras.mkdir(parents=True)
    (keras / "cifar-10-batches-py").symlink_to(cifar_python_dir)
    assert data.resolve_path(None) == keras / "cifar-10-batches-py"
    cache = isolated_home / ".cache" / "cnnlab"
    cache.mkdir(parents=True)
    (cache / "cifar-10-batches-bin").symlink_to(cifar_binary_dir)
    assert data.resolve_path(None) == cache / "cifar-10-batches-bin"
    monkeypatch.setenv("CNNLAB_DATA", str(cifar_python_dir))
    assert data.resolve_path(None) == cifar_python_dir
    assert data.resolve_path(cifar_binary_dir) == cifar_binary_dir  # --data wins over everything


class _Server:
    def __init__(self, directory: Path):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(directory), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def server(tmp_path, cifar_python_dir):
    (tmp_path / "srv").mkdir()
    make_tar_gz(cifar_python_dir, tmp_path / "srv" / "cifar-10-python.tar.gz")
    s = _Server(tmp_path / "srv")
    yield s, hashlib.md5((tmp_path / "srv" / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    s.close()


def test_download_verifies_md5_and_is_used(server, isolated_home, monkeypatch, cifar_batches):
    srv, md5 = server
    monkeypatch.setattr(cifar, "URL", f"{srv.url}/cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar, "MD5", md5)
    ds = data.load_dataset(None)
    assert (isolated_home / ".cache" / "cnnlab" / "cifar-10-python.tar.gz").is_file()
    assert np.array_equal(ds.y_test.numpy(), expected(cifar_batches)[3])


@pytest.mark.parametrize("path,md5", [("cifar-10-python.tar.gz", "0" * 32), ("missing.tar.gz", None)])
def test_failed_download_leaves_nothing(server, isolated_home, monkeypatch, path, md5):
    srv, good = server
    monkeypatch.setattr(cifar, "URL", f"{srv.url}/{path}")
    monkeypatch.setattr(cifar, "MD5", md5 or good)
    with pytest.raises(CnnlabError, match="corrupt|cannot download"):
        data.load_dataset(None)
    cache = isolated_home / ".cache" / "cnnlab"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_info_lists_format_classes_and_counts(cifar_python_dir):
    text = data.info(data.load_dataset(cifar_python_dir))
    assert "cifar-python" in text and "32x32, 3 channels" in text
    assert "airplane" in text and "truck" in text
    total = [ln for ln in text.splitlines() if ln.startswith("total")][0].split()
    assert total[1:] == ["150", "30"]


def test_real_jpeg_subset_loads(real_subset):
    ds = data.load_dataset(real_subset)
    assert ds.classes == CLASSES
    assert ds.x_train.shape == (5000, 3, 32, 32) and ds.x_test.shape == (1000, 3, 32, 32)
    assert 80 < ds.x_train.float().mean() < 160  # natural photos, not blank or saturated


def test_a_csv_data_set_is_decoded_again_when_its_images_change(tmp_path):
    """The cache key of a CSV covers the files it names: replacing every image (the CSV untouched) must not keep
    the old pixels."""
    import os

    from PIL import Image

    for i in range(8):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "data.csv").write_text("".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(8)))
    first = data.load_dataset(tmp_path / "data.csv")
    for i in range(8):
        Image.new("RGB", (8, 8), (0, 200, 10 * i)).save(tmp_path / f"{i}.png")
        os.utime(tmp_path / f"{i}.png", ns=(1, 10**18 + i))
    again = data.load_dataset(tmp_path / "data.csv")
    assert int(first.x_train[:, 1].max()) == 0 and int(again.x_train[:, 1].min()) == 200


def test_a_class_folder_1100_levels_deep_is_read(tmp_path, capsys):
    """Python 3.11's recursive os.walk raised RecursionError past ~1,000 levels, and realpath per folder made the
    walk quadratic (28 s of system time): the walk is iterative and identifies folders by inode."""
    import os

    from PIL import Image

    from cnnlab import cli

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (200 * (c == "a"), 0, 0)).save(tmp_path / split / c / "top.png")
    fds = [os.open(tmp_path / "train" / "a", os.O_RDONLY)]
    for _ in range(1100):
        os.mkdir("d", dir_fd=fds[-1])
        fds.append(os.open("d", os.O_RDONLY, dir_fd=fds[-1]))
    with open(os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fds[-1]), "wb") as f:
        Image.new("RGB", (8, 8), (200, 0, 0)).save(f, "PNG")
    try:
        assert cli.main(["data", "info", "--data", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert [line.split() for line in out.splitlines() if line.startswith("total")] == [["total", "3", "2"]]
    finally:  # bottom up: pytest's own cleanup (shutil.rmtree, recursive) cannot delete a tree this deep
        os.unlink("deep.png", dir_fd=fds[-1])
        for parent, child in zip(fds[-2::-1], fds[:0:-1], strict=True):
            os.close(child)
            os.rmdir("d", dir_fd=parent)
        os.close(fds[0])


def _damage(folder, kind: str) -> None:
    import json as _json

    meta = folder / "meta.json"
    doc = _json.loads(meta.read_text())
    if kind == "zeroed pixels":
        (folder / "test.u8").write_bytes(bytes((folder / "test.u8").stat().st_size))
    elif kind == "random pixels":
        (folder / "test.u8").write_bytes(np.random.default_rng(0).bytes((folder / "test.u8").stat().st_size))
    elif kind == "truncated pixels":
        (folder / "train.u8").write_bytes((folder / "train.u8").read_bytes()[:-100])
    elif kind == "shuffled labels":
        y = np.load(folder / "train.labels.npy")
        np.save(folder / "train.labels.npy", np.roll(y, 1))
    elif kind == "labels out of range":
        y = np.load(folder / "test.labels.npy")
        y[0] = 99
        np.save(folder / "test.labels.npy", y)
    elif kind == "labels not an array":
        (folder / "train.labels.npy").write_text("garbage")
    elif kind == "negative count":
        doc["counts"]["train"]["total"] = -5
        meta.write_text(_json.dumps(doc))
    elif kind == "string count":
        doc["counts"]["test"]["total"] = "ten"
        meta.write_text(_json.dumps(doc))
    else:
        meta.write_text({"meta as []": "[]", "meta as null": "null", "meta truncated": '{"counts": {'}[kind])


DAMAGE = ["zeroed pixels", "random pixels", "truncated pixels", "shuffled labels", "labels out of range",
          "labels not an array", "negative count", "string count", "meta as []", "meta as null", "meta truncated"]


def test_every_kind_of_cache_damage_is_found_and_decoded_again(cifar_python_dir):
    """Each damage of issue 31 to a decoded entry: the next load says so in one line, decodes again (in place
    of the damaged copy, which is never kept), and gives exactly the first load's images and labels."""
    from cnnlab import logs
    from cnnlab.data import cache

    first = data.load_dataset(cifar_python_dir)
    x, y, xt, yt = (t.clone() for t in (first.x_train, first.y_train, first.x_test, first.y_test))
    folder = next((cache.sources.cache_dir() / "decoded").iterdir())
    for kind in DAMAGE:
        _damage(folder, kind)
        with logs.captured() as said:
            again = data.load_dataset(cifar_python_dir)
        assert [line for line in said if "is damaged" in line and "decoding it again" in line], (kind, said)
        assert torch.equal(again.x_train, x) and torch.equal(again.y_train, y), kind
        assert torch.equal(again.x_test, xt) and torch.equal(again.y_test, yt), kind
        assert [p.name for p in folder.parent.iterdir()] == [folder.name], kind  # nothing left beside it
