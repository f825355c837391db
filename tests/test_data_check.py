"""`cnnlab data check`: planted copies, leaks, conflicts and odd files are found and named; real CIFAR images
with planted leaks; likely label errors found above chance; `train` warns about exact train/test copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab import cli, logs, presets, training
from cnnlab.config import DataConfig, override
from conftest import SHARED_JPEG, write_image_folder

pytest.importorskip("imagehash")


def _photo(rng, size=64) -> Image.Image:
    """A smooth random picture (blurred noise, upscaled): JPEG and resizing change it a little, as photos."""
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


@pytest.fixture
def planted(tmp_path) -> Path:
    """30 distinct pictures per class in train, 8 in test, then the faults the check must find."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for split, n in (("train", 30), ("test", 8)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _photo(rng).save(root / split / c / f"{i:02d}.png")
    test = root / "test" / "a"
    Image.open(test / "00.png").save(root / "train" / "a" / "exact-copy.bmp")  # same pixels, another format
    Image.open(test / "01.png").resize((48, 48)).save(root / "train" / "a" / "near-copy.jpg", quality=60)
    shutil.copy(root / "train" / "b" / "03.png", root / "train" / "c" / "filed-twice.png")
    original = Image.open(root / "train" / "a" / "05.png")
    original.crop((3, 3, 61, 61)).save(root / "train" / "a" / "cropped.png")  # 9% of each side cut away
    Image.fromarray(np.clip(np.asarray(original, np.int16) + 14, 0, 255).astype(np.uint8)).save(
        root / "train" / "a" / "brighter.png")
    (root / "train" / "c" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(root / "train" / "b" / "grey.png")
    _photo(rng).resize((64, 12)).save(root / "train" / "b" / "panorama.png")
    _photo(rng).resize((16, 16)).save(root / "train" / "b" / "thumbnail.png")
    return root


def _names(refs) -> set[str]:
    return {r["file"] for r in refs}


def test_planted_faults_are_found_and_named(planted, tmp_path, capsys):
    out = tmp_path / "check.json"
    page = tmp_path / "check.html"
    assert cli.main(["data", "check", "--data", str(planted), "--json", str(out), "--html", str(page)]) == 0
    said = capsys.readouterr().out
    found = json.loads(out.read_text())
    leaks = {(leak["train"]["file"], leak["held_out"]["file"], leak["exact"]) for leak in found["leaks"]}
    assert leaks == {("train/a/exact-copy.bmp", "test/a/00.png", True),
                     ("train/a/near-copy.jpg", "test/a/01.png", False)}
    assert [sorted(_names(c["images"])) for c in found["conflicts"]] == [["train/b/03.png", "train/c/filed-twice.png"]]
    assert [c["classes"] for c in found["conflicts"]] == [["b", "c"]]
    groups = [sorted(_names(d["images"])) for d in found["duplicates"]]
    assert sorted(groups) == [["test/a/00.png", "train/a/exact-copy.bmp"], ["test/a/01.png", "train/a/near-copy.jpg"],
                              ["train/a/05.png", "train/a/brighter.png", "train/a/cropped.png"],
                              ["train/b/03.png", "train/c/filed-twice.png"]]
    assert len(found["unreadable"]) == 1 and "broken.jpg" in found["unreadable"][0]
    assert _names(found["grey"]) == {"train/b/grey.png"}
    assert _names(found["aspect"]) == {"train/b/panorama.png"}
    assert _names(found["tiny"]) == {"train/b/thumbnail.png", "train/b/panorama.png"}  # 12 px high: both
    assert "leaks:" in said and "2 training image(s) are copies of test images (1 exact)" in said
    html = page.read_text()
    pictured = 2 * 2 + 2 + 9 + 1 + 1 + 2  # leak pairs, the conflict, duplicate groups, grey, aspect, tiny
    assert html.count("<img ") == pictured and "broken.jpg" in html


def test_strict_fails_on_leaks_and_a_clean_set_passes(planted, tmp_path):
    assert cli.main(["data", "check", "--data", str(planted), "--strict"]) == 1
    clean = write_image_folder(tmp_path / "clean", per_class=6, size=(16, 16))
    assert cli.main(["data", "check", "--data", str(clean), "--strict"]) == 0


def test_bad_input_is_one_line_and_writes_nothing(planted, tmp_path, capsys):
    assert cli.main(["data", "check", "--data", str(tmp_path / "missing")]) == 2
    assert cli.main(["data", "check", "--data", str(planted), "--json", str(tmp_path)]) == 2
    assert cli.main(["data", "check", "--data", str(planted), "--html", str(tmp_path / "no" / "x.html")]) == 2
    with pytest.raises(SystemExit) as refused:  # argparse's own exit, as for every flag of a wrong type
        cli.main(["data", "check", "--data", str(planted), "--near", "40"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 4 and "Traceback" not in err
    assert "is a folder" in err and "does not exist" in err and "--near" in err
    assert not (tmp_path / "no").exists()


def test_one_decode_serves_the_check_and_training(planted, tmp_path):
    """The check lists unreadable files yet shares its decoded entry with training, which still refuses them
    unless told to skip them."""
    from cnnlab.data import decode

    cli.main(["data", "check", "--data", str(planted)])
    before = decode.decoded()
    with pytest.raises(Exception, match="unreadable image file"):
        training.train(override(presets.get("seed"), epochs=1), DataConfig(path=str(planted)), out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    cfg = override(presets.get("seed"), epochs=1)
    with logs.captured() as said:
        run = training.train(cfg, DataConfig(path=str(planted), skip_bad_images=True), out=tmp_path / "r",
                             with_report=False)
    assert decode.decoded() == before  # nothing decoded again
    warning = [line for line in said if "exactly the pixels of test images" in line]
    assert len(warning) == 1 and "1 training image(s)" in warning[0] and "cnnlab data check" in warning[0]
    assert json.loads((run / "config.json").read_text())["data"]["exact_copies_of_held_out"] == {"test": 1}


def test_real_cifar_images_with_planted_leaks(tmp_path):
    """300 training and 100 test images of CIFAR-10 (JPEG copy): what the untouched set already holds, then 10
    test images copied into training (5 as PNG, 5 resized to 40 px at JPEG quality 60) and 4 training images
    filed under a second class. Every planted fault is found, and nothing else is new."""
    if not SHARED_JPEG.is_dir():
        pytest.skip(f"real CIFAR-10 data not found at {SHARED_JPEG}")
    root = tmp_path / "cifar"
    classes = sorted(p.name for p in (SHARED_JPEG / "train").iterdir())
    for split, n in (("train", 30), ("test", 10)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((SHARED_JPEG / split / c).iterdir())[:n]:
                shutil.copy(f, root / split / c / f.name)
    before = _check(root, tmp_path / "before.json")
    tests = sorted((root / "test").glob("*/*.jpg"))[::10][:10]
    for i, f in enumerate(tests):
        im = Image.open(f)
        if i < 5:
            im.save(root / "train" / f.parent.name / f"leak{i}.png")
        else:
            im.resize((40, 40)).save(root / "train" / f.parent.name / f"leak{i}.jpg", quality=60)
    moved = sorted((root / "train").glob("*/*.jpg"))[::75][:4]
    for k, f in enumerate(moved):
        other = classes[(classes.index(f.parent.name) + 1) % len(classes)]
        shutil.copy(f, root / "train" / other / f"twice{k}.jpg")
    after = _check(root, tmp_path / "after.json")
    old = {(x["train"]["file"], x["held_out"]["file"]) for x in before["leaks"]}
    new = {(x["train"]["file"], x["held_out"]["file"]) for x in after["leaks"]} - old
    assert new == {(f"train/{f.parent.name}/leak{i}.{'png' if i < 5 else 'jpg'}", f"test/{f.parent.name}/{f.name}")
                   for i, f in enumerate(tests)}
    conflicts = [set(_names(c["images"])) for c in after["conflicts"]]
    for k, f in enumerate(moved):
        assert any(f"train/{f.parent.name}/{f.name}" in c and any(n.endswith(f"twice{k}.jpg") for n in c)
                   for c in conflicts)
    assert len(after["conflicts"]) == len(before["conflicts"]) + 4


def _check(root: Path, out: Path) -> dict:
    assert cli.main(["data", "check", "--data", str(root), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_label_check_finds_flipped_labels_and_the_report_marks_them(tmp_path, capsys):
    """Class-coloured images (a model learns them at once) with 10% of the training labels moved to another
    class: the out-of-fold ranking names mostly the moved ones (chance: 10%). A test image filed in the wrong
    class is marked among the run's top losses."""
    pytest.importorskip("cleanlab")
    root = write_image_folder(tmp_path / "colours", per_class=40, size=(16, 16))
    rng = np.random.default_rng(0)
    moved = set()
    for k, c in enumerate("abc"):
        for f in rng.choice(sorted((root / "train" / c).iterdir()), 4, replace=False):
            to = "abc"[(k + 1) % 3]
            f.rename(root / "train" / to / f"moved-{c}-{f.name}")
            moved.add(f"train/{to}/moved-{c}-{f.name}")
    wrong = root / "test" / "a" / "000.png"
    wrong.rename(root / "test" / "b" / "wrong.png")
    out = tmp_path / "labels.json"
    assert cli.main(["data", "check", "--data", str(root), "--labels", "--folds", "3", "--json", str(out)]) == 0
    suspects = json.loads(out.read_text())["label_suspects"]
    train = [s for s in suspects if s["split"] == "train"]
    hits = sum(s["file"] in moved for s in train)
    assert hits >= 8 and hits / len(train) >= 0.5, train  # 12 moved of 120; precision far above 10%
    assert all(s["suggested"] != s["label"] for s in train if s["file"] in moved)
    assert any(s["file"] == "test/b/wrong.png" and s["suggested"] == "a" for s in suspects)
    run = training.train(override(presets.get("seed"), epochs=3), DataConfig(path=str(root)), out=tmp_path / "r")
    html = (run / "report.html").read_text()
    assert "label doubted" in html


def test_cifar_arrays_name_images_by_split_and_index_and_imbalance_is_hinted(tmp_path):
    """Arrays have no file names: images are named by split and index. A test image copied into a training
    batch is a leak; a class with a third of the others' images gets the --class-weights hint."""
    from conftest import fake_cifar_arrays, write_cifar_python

    batches = fake_cifar_arrays()
    (x0, y0), (xt, yt) = batches[0], batches[5]
    x0[7] = xt[3]
    y0[7] = yt[3]
    data = write_cifar_python(tmp_path / "cifar-10-batches-py", batches)
    out = tmp_path / "arrays.json"
    assert cli.main(["data", "check", "--data", str(data), "--json", str(out)]) == 0
    leaks = json.loads(out.read_text())["leaks"]
    assert [(x["train"]["split"], x["train"]["index"], x["train"]["file"], x["held_out"]["index"]) for x in leaks] \
        == [("train", 7, None, 3)]
    folder = write_image_folder(tmp_path / "imbalanced", per_class=9, size=(16, 16))
    for f in sorted((folder / "train" / "a").iterdir())[3:]:
        f.unlink()
    assert cli.main(["data", "check", "--data", str(folder), "--json", str(out)]) == 0
    imbalance = json.loads(out.read_text())["imbalance"]
    assert imbalance["smallest"] == "a" and imbalance["ratio"] == 3.0 and "--class-weights auto" in imbalance["hint"]
