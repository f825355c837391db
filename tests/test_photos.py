"""Your own photos: every folder layout, every image format, the size policy, the memory-mapped cache, predict.

All images are generated here from synthetic pixels; real photos' properties (EXIF orientation, 16-bit
PNG, CMYK, alpha, animation) are made with Pillow.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import data, logs, presets, training
from cnnlab.config import DataConfig, override
from cnnlab.data import cache, decode, folders, images
from cnnlab.errors import CnnlabError
from cnnlab.presets import PHOTOS


def photo(color: tuple[int, int, int], size=(80, 60), seed: int = 0) -> Image.Image:
    """A (width, height) image of one colour with a little noise, so that JPEG has something to encode."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, float) + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}


def write_split(root, per_class: int = 4, size=(80, 60), ext: str = "jpg", classes=COLORS):
    for name, color in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(color, size, i).save(root / name / f"{i}.{ext}")
    return root


def _mapped(tensor: torch.Tensor, name: str) -> bool:
    """Whether the tensor's pixels are a mapping of the cache file `name` (not a copy in memory)."""
    for line in open("/proc/self/maps").read().splitlines():
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if line.endswith(name) and lo <= tensor.data_ptr() < hi:
            return True
    return False


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], capture_output=True, text=True, env=env)


# ---------------------------------------------------------------------------------------------------
# Layouts


def test_split_folders_with_a_validation_folder(tmp_path):
    write_split(tmp_path / "train", 5)
    write_split(tmp_path / "valid", 2)
    write_split(tmp_path / "test", 3)
    ds = data.load_dataset(tmp_path)
    assert ds.classes == ["blue", "green", "red"] and ds.layout == "split folders"
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (15, 6, 9)
    assert ds.validation[0] is ds.x_val  # training validates on val/, the test set stays for the end
    with pytest.raises(CnnlabError, match="own validation folder"):
        ds.hold_out(0.2, 0)


def test_a_folder_with_train_val_and_test_trains_to_the_end_of_the_run(tmp_path):
    """The README's first layout through config.json, the final evaluation and the report."""
    from cnnlab.cli import main

    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        write_split(tmp_path / "photos" / split, n)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "photos"), "--preset", "photos", "--epochs", "1",
                 "--image-size", "32x32", "--threads", "2", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["validation"] == "the data's own validation split, 6 images"
    assert (config["data"]["train_images"], config["data"]["val_images"], config["data"]["test_images"]) == (18, 6, 6)
    assert json.loads((run / "metrics.json").read_text())["test_images"] == 6  # the test set, not val/
    page = (run / "report.html").read_text()
    assert "18 / 6 / 6" in page and "the data&#x27;s own validation split" in page


def test_two_validation_folders_are_refused(tmp_path):
    for split in ("train", "val", "validation"):
        write_split(tmp_path / split, 1)
    with pytest.raises(CnnlabError, match="two val folders"):
        data.load_dataset(tmp_path)


def test_flat_class_folders_hold_out_a_recorded_stratified_test_set(tmp_path):
    write_split(tmp_path, 10)
    ds = data.load_dataset(tmp_path, val_fraction=0.2, split_seed=3)
    assert ds.layout == "class folders" and "20%" in ds.split and "seed 3" in ds.split
    assert torch.bincount(ds.y_test).tolist() == [2, 2, 2] and len(ds.y_train) == 24
    again = data.load_dataset(tmp_path, val_fraction=0.2, split_seed=3, use_cache=False)
    assert torch.equal(ds.x_test, again.x_test)  # the same split every time
    other = data.load_dataset(tmp_path, val_fraction=0.2, split_seed=4)
    assert not torch.equal(ds.x_test, other.x_test)


def test_images_at_any_depth_and_ignored_files_are_counted(tmp_path):
    write_split(tmp_path / "train", 2)
    write_split(tmp_path / "test", 1)
    deep = tmp_path / "train" / "red" / "2024" / "june"
    deep.mkdir(parents=True)
    photo(COLORS["red"]).save(deep / "deep.jpg")
    (tmp_path / "train" / "red" / ".hidden.jpg").write_bytes(b"not even an image")
    (tmp_path / "train" / "red" / "notes.txt").write_text("shot on holiday")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")
    ds = data.load_dataset(tmp_path)
    assert torch.bincount(ds.y_train).tolist() == [2, 2, 3]
    assert ds.ignored == {"hidden": 2, "not an image": 1}
    out = cli("data", "info", "--data", str(tmp_path), env=None)
    assert out.returncode == 0 and "ignored:     2 hidden file(s), 1 not an image file(s)" in out.stdout


def test_csv_of_paths_and_labels(tmp_path):
    write_split(tmp_path / "pics", 6)
    rows = [f"pics/{c}/{i}.jpg,{c.upper()}" for c in COLORS for i in range(6)]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    ds = data.load_dataset(tmp_path / "labels.csv", val_fraction=1 / 3)
    assert ds.layout == "csv" and ds.classes == ["BLUE", "GREEN", "RED"]
    assert (len(ds.y_train), len(ds.y_test)) == (12, 6)
    (tmp_path / "headless.csv").write_text("\n".join(rows))  # a header row is optional
    assert data.load_dataset(tmp_path / "headless.csv").classes == ds.classes


@pytest.mark.parametrize("header", ["filename,class", "file,category", "image,label", "Path,Target"])
def test_csv_headers_name_their_columns_in_any_order(tmp_path, header):
    write_split(tmp_path / "pics", 3)
    path_name, label_name = header.split(",")
    rows = [f"{c.upper()},pics/{c}/{i}.jpg" for c in COLORS for i in range(3)]  # the label first
    (tmp_path / "l.csv").write_text(f"{label_name},{path_name}\n" + "\n".join(rows) + "\n")
    ds = data.load_dataset(tmp_path / "l.csv", val_fraction=1 / 3)
    assert ds.classes == ["BLUE", "GREEN", "RED"] and (len(ds.y_train), len(ds.y_test)) == (6, 3)


def test_a_csv_split_column_is_honoured(tmp_path):
    write_split(tmp_path / "pics", 6)
    split = ["train", "train", "train", "val", "test", "test"]
    rows = [f"pics/{c}/{i}.jpg,{c},{split[i]}" for c in COLORS for i in range(6)]
    (tmp_path / "s.csv").write_text("filename,class,split\n" + "\n".join(rows) + "\n")
    ds = data.load_dataset(tmp_path / "s.csv")
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (9, 3, 6) and ds.validation[0] is ds.x_val
    fastai = [f"pics/{c}/{i}.jpg,{c},{i >= 4}" for c in COLORS for i in range(6)]  # fastai's valid_col
    (tmp_path / "f.csv").write_text("name,label,is_valid\n".replace("name", "fname") + "\n".join(fastai) + "\n")
    ds = data.load_dataset(tmp_path / "f.csv", val_fraction=1 / 3)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (8, 6, 4)  # the test set held out of train
    (tmp_path / "h.csv").write_text("\n".join(rows))  # no header: path,label,split by position
    assert len(data.load_dataset(tmp_path / "h.csv").y_val) == 3


@pytest.mark.parametrize("make, message", [
    (lambda r: (r / "x.csv").write_text("picture,kind\na.jpg,cat\n"), "names no image path column; name them"),
    (lambda r: (r / "x.csv").write_text("file,kind\na.jpg,cat\n"), "the header 'file,kind' names no label"),
    (lambda r: (write_split(r / "p", 1), (r / "x.csv").write_text("p/red/0.jpg,red,holdout\np/blue/0.jpg,blue,train")),
     "row 1: split 'holdout' is not one of"),
    (lambda r: (write_split(r / "train", 2), (r / "train" / "empty").mkdir()), "has no images"),
    (lambda r: write_split(r / "train", 2, classes={"only": (1, 2, 3)}), "at least two classes"),
    (lambda r: (write_split(r / "train", 2), write_split(r / "test", 1, classes={"pink": (250, 100, 200)})),
     "pink that"),
    (lambda r: (r / "x.csv").write_text("a.jpg\n"), "not `path,label`"),
    (lambda r: (r / "x.csv").write_text("a.jpg,cat\nb.jpg,dog\n"), "do not exist"),
])
def test_layout_errors_are_one_line(tmp_path, make, message):
    make(tmp_path)
    target = tmp_path / "x.csv" if (tmp_path / "x.csv").exists() else tmp_path
    out = cli("data", "info", "--data", str(target))
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not list((tmp_path.parent).glob("**/.building-*"))


# ---------------------------------------------------------------------------------------------------
# Formats


def _save(im: Image.Image, path, **kw):
    im.save(path, **kw)
    return path


def test_every_format_decodes_to_the_pixels_a_viewer_shows(tmp_path):
    red = photo((200, 30, 30), (16, 12))
    cases = {name: _save(red, tmp_path / f"x.{name}") for name in ("jpg", "png", "bmp", "tiff", "webp", "avif")}
    cases["gif"] = _save(red.convert("P", palette=Image.ADAPTIVE), tmp_path / "x.gif")
    cases["palette png"] = _save(red.convert("P", palette=Image.ADAPTIVE), tmp_path / "p.png")
    for name, path in cases.items():
        arr = images.decode_image(path, None, None)
        assert arr.shape == (12, 16, 3), name
        assert abs(arr[..., 0].mean() - 200) < 25 and arr[..., 2].mean() < 70, name


def test_heic_through_the_optional_extra(tmp_path, monkeypatch):
    heif = pytest.importorskip("pillow_heif")
    heif.from_pillow(photo((30, 200, 40), (16, 16))).save(tmp_path / "x.heic")
    arr = images.decode_image(tmp_path / "x.heic", None, (8, 8))
    assert arr.shape == (8, 8, 3) and arr[..., 1].mean() > 150
    (tmp_path / "y.heic").write_bytes(b"\0" * 64)
    monkeypatch.setattr(images, "HAVE_HEIF", False)
    with pytest.raises(CnnlabError, match=r"pillow-heif: pip install 'cnnlab\[heif\]'"):
        images.decode_image(tmp_path / "y.heic", None, None)


def test_sixteen_bit_grey_png_keeps_its_levels(tmp_path):
    levels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63,000 of 65,535
    Image.fromarray(levels).save(tmp_path / "deep.png")
    arr = images.decode_image(tmp_path / "deep.png", None, None)
    assert arr.shape == (8, 8, 1)
    assert np.array_equal(arr[..., 0], (levels >> 8).astype(np.uint8))  # not clipped to white


def test_alpha_palette_cmyk_and_animation(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black: shows as white
    rgba.save(tmp_path / "alpha.png")
    arr = images.decode_image(tmp_path / "alpha.png", None, None)
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[1, 1].tolist() == [255, 0, 0]
    Image.new("RGB", (8, 8), (200, 100, 50)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert np.abs(images.decode_image(tmp_path / "cmyk.jpg", None, None)[4, 4].astype(int) - [200, 100, 50]).max() < 8
    frames = [Image.new("RGB", (6, 6), c) for c in ((0, 0, 255), (255, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert images.decode_image(tmp_path / "anim.gif", None, None)[3, 3].tolist() == [0, 0, 255]  # the first frame


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # white on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    arr = images.decode_image(tmp_path / "sideways.jpg", None, None)
    assert arr.shape[:2] == (40, 20)  # shown upright: taller than wide
    assert arr[:10].mean() > 200 and arr[-10:].mean() < 50  # the stored left edge is now the top
    assert images.image_size(tmp_path / "sideways.jpg") == (40, 20)


def test_data_info_describes_the_files_themselves_and_an_imbalance(tmp_path):
    """Formats, sizes as shown, EXIF turns and transparency of the files (recorded when they were decoded), and
    a class imbalance with the flag that answers it."""
    write_split(tmp_path / "train", 6, size=(300, 200))  # 6 JPEGs of each colour
    for i in range(12):  # red gets 12 more: 18 against 6
        photo(COLORS["red"], (120, 90), i).save(tmp_path / "train" / "red" / f"more{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned: 200 wide, 300 high
    photo(COLORS["blue"], (300, 200)).save(tmp_path / "train" / "blue" / "sideways.jpg", exif=exif)
    clear = photo(COLORS["green"], (100, 100)).convert("RGBA")
    clear.putpixel((0, 0), (0, 0, 0, 0))
    clear.save(tmp_path / "train" / "green" / "alpha.webp")
    write_split(tmp_path / "test", 1)
    out = cli("data", "info", "--data", str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "files:       22 JPEG, 12 PNG, 1 WEBP" in text
    assert "file sizes:  width 80-300 px (median 300), height 60-300 px (median 200), as shown" in text
    assert "EXIF:        1 photo(s) turned or mirrored upright" in text and "alpha:       1 image(s)" in text
    assert "imbalance:   the largest class has 2.6x the training images of the smallest (red 18, blue 7); " \
           "--class-weights auto" in text


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this system")
def test_fifos_and_devices_named_like_images_are_left_out_not_waited_for(tmp_path, photo_run):
    import os

    write_split(tmp_path / "d" / "train", 2)
    write_split(tmp_path / "d" / "test", 1)
    os.mkfifo(tmp_path / "d" / "train" / "red" / "pipe.jpg")  # opening it would wait for a writer forever
    out = subprocess.run([sys.executable, "-m", "cnnlab.cli", "data", "info", "--data", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "1 special (FIFO, device, socket) file(s)" in out.stdout
    _, run = photo_run
    image = tmp_path / "d" / "test" / "red" / "0.jpg"
    out = subprocess.run([sys.executable, "-m", "cnnlab.cli", "predict", str(run), str(tmp_path / "d" / "train" /
                          "red" / "pipe.jpg"), "/dev/zero", str(image)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout.startswith(f"{image}: red")
    assert "2 of 3 file(s) could not be read" in out.stderr and "is not a regular file" in out.stderr


def test_train_says_how_it_weights_classes(tmp_path):
    write_split(tmp_path / "train", 2)
    for i in range(4):
        photo(COLORS["red"], (80, 60), i).save(tmp_path / "train" / "red" / f"more{i}.jpg")
    write_split(tmp_path / "test", 1)
    with logs.captured() as lines:
        training.train(override(PHOTOS, epochs=1, class_weights="auto", threads=2),
                       DataConfig(path=str(tmp_path), image_size=(32, 32)), out=tmp_path / "run", with_report=False)
    assert "class weights (--class-weights auto, the rarer the heavier): blue 1.67, green 1.67, red 0.56" in lines


# ---------------------------------------------------------------------------------------------------
# Size policy


def _halves(w: int, h: int) -> Image.Image:
    im = Image.new("RGB", (w, h), (255, 0, 0))
    im.paste((0, 0, 255), (w // 2, 0, w, h))
    return im


def test_crop_pad_and_squish():
    im = _halves(200, 100)  # red left half, blue right half, 2:1
    crop = np.asarray(images.resize_to(im, (50, 50), "crop"))
    pad = np.asarray(images.resize_to(im, (50, 50), "pad"))
    squish = np.asarray(images.resize_to(im, (50, 50), "squish"))
    assert crop.shape == pad.shape == squish.shape == (50, 50, 3)
    assert crop[:, 5, 0] .min() > 200 and crop[:, 45, 2].min() > 200  # the centre 100x100, both colours
    assert pad[:10].max() == 0 and pad[-10:].max() == 0 and pad[25, 5, 0] > 200  # black bars above and below
    assert squish[25, 2, 0] > 200 and squish[25, 47, 2] > 200 and squish[:3].min() < 10  # stretched, no bars


def test_default_size_small_images_keep_theirs_photos_become_128(tmp_path):
    write_split(tmp_path / "small" / "train", 2, size=(30, 20))
    assert data.load_dataset(tmp_path / "small").image_size == (20, 30)
    write_split(tmp_path / "big" / "train", 2, size=(300, 200))
    ds = data.load_dataset(tmp_path / "big")
    assert ds.image_size == (cache.DEFAULT_IMAGE_SIZE,) * 2 and ds.resize == "crop"
    assert data.load_dataset(tmp_path / "big", image_size=(48, 64), resize="pad").image_size == (48, 64)


def test_image_size_on_cifar(cifar_python_dir):
    ds = data.load_dataset(cifar_python_dir, image_size=(16, 16))
    assert ds.image_size == (16, 16) and ds.x_test.shape[1:] == (3, 16, 16)
    assert data.load_dataset(cifar_python_dir).image_size == (32, 32)


def test_draft_mode_decodes_a_large_jpeg_like_a_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(base).resize((1600, 1200), Image.BICUBIC).save(tmp_path / "big.jpg", quality=92)
    fast = images.decode_image(tmp_path / "big.jpg", None, (96, 96)).astype(int)
    with Image.open(tmp_path / "big.jpg") as im:
        full = np.asarray(images.resize_to(im.convert("RGB"), (96, 96), "crop")).astype(int)
    assert np.abs(fast - full).mean() < 4
    with Image.open(tmp_path / "big.jpg") as im:
        images._draft(im, (96, 96), "crop")
        assert im.size == (200, 150)  # decoded at 1/8 scale: still covers 96x96 after the crop


# ---------------------------------------------------------------------------------------------------
# The memory-mapped cache


def test_the_cache_is_mapped_and_keyed_by_the_resolved_path(tmp_path, monkeypatch):
    write_split(tmp_path / "d" / "train", 3)
    ds = data.load_dataset(tmp_path / "d")
    assert _mapped(ds.x_train, "train.u8")
    monkeypatch.chdir(tmp_path)
    before = decode.decoded()
    again = data.load_dataset("./d/../d")
    assert decode.decoded() == before, "decoded again for another spelling"
    assert torch.equal(ds.x_train, again.x_train)


def test_the_decode_pool_decodes_what_one_thread_does(tmp_path, monkeypatch):
    write_split(tmp_path / "train", 12, size=(90, 70))
    one = data.load_dataset(tmp_path, use_cache=False, image_size=(24, 24))
    monkeypatch.setattr(decode, "POOL_FROM", 4)
    monkeypatch.setattr(decode, "CHUNK", 5)
    pooled = data.load_dataset(tmp_path, use_cache=False, image_size=(24, 24))
    assert torch.equal(one.x_train, pooled.x_train) and torch.equal(one.x_test, pooled.x_test)


def test_the_pool_works_from_a_script_without_a_main_guard(tmp_path):
    """Workers must not run the caller's script again (spawn and forkserver do): here it is read from stdin."""
    write_split(tmp_path / "train", 12, size=(90, 70))
    code = ("import sys; from cnnlab import data; from cnnlab.data import decode; "
            "decode.POOL_FROM = 4; decode.CHUNK = 5; "
            "ds = data.load_dataset(sys.argv[1], use_cache=False); print('loaded', len(ds.y_train) + len(ds.y_test))")
    out = subprocess.run([sys.executable, "-", str(tmp_path)], input=code, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "loaded 36" in out.stdout, out.stderr[-2000:]


def test_skipped_bad_files_are_named_and_the_rest_keep_their_order(tmp_path, monkeypatch):
    write_split(tmp_path / "train", 4)
    write_split(tmp_path / "test", 2)
    clean = data.load_dataset(tmp_path, use_cache=False)
    (tmp_path / "train" / "green" / "1b.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(CnnlabError, match="1b.jpg"):
        data.load_dataset(tmp_path)
    assert not list(cache.sources.cache_dir().glob("decoded/.building-*"))  # nothing half-made is left
    ds = data.load_dataset(tmp_path, skip_bad_images=True)
    assert len(ds.skipped) == 1 and "1b.jpg" in ds.skipped[0]
    assert torch.equal(ds.x_train, clean.x_train) and torch.equal(ds.y_train, clean.y_train)
    out = cli("data", "info", "--data", str(tmp_path), "--skip-bad-images")
    assert "skipped:     1 unreadable file(s)" in out.stdout and "1b.jpg" in out.stdout


def test_a_grey_folder_has_one_channel(tmp_path):
    for c, level in (("dark", 40), ("light", 210)):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (10, 10), level + i).save(tmp_path / "train" / c / f"{i}.png")
    ds = data.load_dataset(tmp_path)
    assert ds.channels == 1 and int(ds.x_train[ds.y_train == 1].float().mean()) in range(205, 215)


def test_normalization_statistics_in_chunks_match_the_direct_ones():
    x = torch.randint(0, 256, (300, 3, 20, 20), dtype=torch.uint8)
    norm = data.Normalization.fit(x)
    xf = x.double() / 255
    assert np.allclose(norm.mean, xf.mean((0, 2, 3)).tolist(), atol=1e-9)
    assert np.allclose(norm.std, xf.std((0, 2, 3)).tolist(), atol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Training, predicting


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_split(root / "train", 16, size=(160, 120))
    write_split(root / "test", 4, size=(120, 160))
    cfg = override(PHOTOS, epochs=2, batch_size=16, threads=2)
    run = training.train(cfg, DataConfig(path=str(root), image_size=(64, 64)), preset="photos",
                      out=tmp_path_factory.mktemp("run") / "r", with_report=False)
    return root, run


def test_photos_preset_trains_and_records_its_preprocessing(photo_run):
    root, run = photo_run
    config = json.loads((run / "config.json").read_text())
    meta = json.loads((run / "model.json").read_text())
    assert config["data"]["resize"] == "crop" and meta["resize"] == "crop" and meta["image_size"] == [64, 64]
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] > 0.6  # three colours: easy


def test_predict_takes_folders_writes_csv_and_reports_bad_files_last(photo_run, tmp_path):
    root, run = photo_run
    (tmp_path / "new" / "deeper").mkdir(parents=True)
    photo(COLORS["blue"], (300, 200)).save(tmp_path / "new" / "a.jpg")
    photo(COLORS["red"], (200, 300)).save(tmp_path / "new" / "deeper" / "b.png")
    (tmp_path / "new" / "broken.jpg").write_bytes(b"nope")
    out = cli("predict", str(run), str(tmp_path / "new"), "--csv", str(tmp_path / "p.csv"), "--top-k", "2")
    assert out.returncode == 2 and "1 of 3 file(s) could not be read" in out.stderr and "broken.jpg" in out.stderr
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "filename,label,confidence,class_1,probability_1,class_2,probability_2,error" and len(rows) == 4
    by_name = {r.split(",")[0].rsplit("/", 1)[1]: r.split(",") for r in rows[1:]}
    assert by_name["a.jpg"][1] == by_name["a.jpg"][3] == "blue" and by_name["b.png"][1] == "red"
    assert by_name["broken.jpg"][7] and by_name["broken.jpg"][1] == ""
    out = cli("predict", str(run), str(tmp_path / "new" / "a.jpg"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["predictions"][0]["class"] == "blue"


def test_a_flatten_network_at_photo_size_is_warned_about(tmp_path):
    out = cli("summary", "--model", "seed", "--image-size", "128")
    assert "in one dense layer after a flatten" in out.stdout and "--image-size" in out.stdout
    assert "warning" not in cli("summary", "--model", "photonet", "--image-size", "128").stdout


def test_random_resized_crop_keeps_the_shape_and_is_the_identity_at_full_scale():
    from cnnlab.data import augment

    x = torch.rand(4, 3, 24, 24)
    g = torch.Generator().manual_seed(0)
    assert augment.random_resized_crop(x, g).shape == x.shape
    same = augment.random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)


def test_decode_bytes_stay_torch_free():
    out = subprocess.run([sys.executable, "-c", "import sys, cnnlab.data.cache, cnnlab.data.folders, "
                          "cnnlab.data.images, cnnlab.data.sources, cnnlab.deploy; print('torch' in sys.modules)"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_jpeg_bytes_roundtrip_for_the_server():
    buf = io.BytesIO()
    photo(COLORS["green"], (400, 300)).save(buf, "JPEG")
    arr = images.decode_image(buf.getvalue(), 3, (32, 32), resize="crop")
    assert arr.shape == (32, 32, 3) and arr[..., 1].mean() > 150
    assert folders.stratified_pick(np.array([0, 0, 1, 1]), 2, 0, 2).tolist() in ([0, 2], [0, 3], [1, 2], [1, 3])


def test_data_info_on_cached_data_never_imports_torch(tmp_path):
    write_split(tmp_path / "train", 2)
    code = ("import sys; from cnnlab import cli; rc = cli.main(['data', 'info', '--data', sys.argv[1]]); "
            "print('torch imported:', 'torch' in sys.modules)")
    for _ in range(2):  # building the cache, then reading it
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert out.returncode == 0 and "torch imported: False" in out.stdout and "total" in out.stdout


def test_building_an_optimizer_leaves_torch_dynamo_unimported():
    code = ("import sys; from cnnlab import models, presets; from cnnlab.training import optim; "
            "opts = [optim.make_optimizer(presets.get(p), models.build('airbench-s')) for p in ('quick', 'standard')]; "
            "[o.zero_grad() or o.load_state_dict(o.state_dict()) for o in opts]; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_command_flushes_its_output_before_leaving(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cnnlab", "presets"], capture_output=True, text=True)
    last = list(presets.PRESETS)[-1]
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith(f"{last}:")  # the last line arrived
    bad = subprocess.run([sys.executable, "-m", "cnnlab", "data", "info", "--data", str(tmp_path / "nothing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("cnnlab: error: data path")


def test_val_split_is_held_out_by_the_cache_without_copying_the_training_set(tmp_path, cifar_python_dir):
    write_split(tmp_path / "train", 10)
    write_split(tmp_path / "test", 2)
    for source in (tmp_path, cifar_python_dir):
        whole = data.load(DataConfig(path=str(source)))
        split = data.load(DataConfig(path=str(source), val_split=0.2))
        assert _mapped(split.x_train, "train.u8") and _mapped(split.x_val, "val.u8")  # both read from disk
        expected = whole.hold_out(0.2, 0)  # the same images as the in-memory hold-out picks
        assert torch.equal(split.x_val, expected.x_val) and torch.equal(split.y_train, expected.y_train)
    (tmp_path / "val").mkdir()
    write_split(tmp_path / "val", 1)
    with pytest.raises(CnnlabError, match="own validation folder"):
        data.load(DataConfig(path=str(tmp_path), val_split=0.2))
