"""Every bad input a hostile review of the command line tried, in one table: each ends in one line,
`cnnlab: error: ...`, and exit status 2 (never "internal error", exit 1, or a traceback), and leaves no run
directory behind. The match names what went wrong, so that a case failing for another reason fails here."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnlab import cli
from conftest import fake_cifar_arrays, write_cifar_python, write_image_folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The fixtures the table needs: data sets, good and damaged runs, stray files."""
    root = tmp_path_factory.mktemp("bad")
    cifar = write_cifar_python(root / "cifar", fake_cifar_arrays())
    run = root / "run"
    assert cli.main(["train", "--data", str(cifar), "--dry-run", "--out", str(run), "--no-report"]) == 0
    paths = {"root": root, "cifar": cifar, "run": run, "images": write_image_folder(root / "images")}
    paths["objects"] = _object_pickle(cifar, root / "objects")
    for name, change in (("config-list", ("config.json", "[]")), ("config-empty", ("config.json", "{}")),
                         ("config-types", ("config.json", '{"train": {"epochs": "x"}, "data": 5}')),
                         ("model-huge", ("model.json", {"image_size": [40000, 40000]})),
                         ("model-classes", ("model.json", {"classes": "abc"})),
                         ("model-text", ("model.json", "not json"))):
        paths[name] = _damaged_copy(run, root / name, *change)
    paths["flipped"] = _damaged_copy(run, root / "flipped", "config.json", None)
    weights = bytearray((paths["flipped"] / "model.safetensors").read_bytes())
    weights[-3] ^= 0x40  # one exponent bit of the last weight
    (paths["flipped"] / "model.safetensors").write_bytes(bytes(weights))
    one_class = write_image_folder(root / "one-class", classes=("a",), test=False)
    paths["one-class"] = one_class
    (root / "notes.png").write_text("not an image")
    (root / "a-file").write_text("x")
    (root / "full").mkdir()
    (root / "full" / "thesis.tex").write_text("mine")
    (root / "bad.csv").write_text("path,label\nnowhere.png,cat\n")
    (root / "layout").mkdir()
    paths["layout"] = root / "layout"
    return paths


def _object_pickle(cifar: Path, dest: Path) -> Path:
    """A CIFAR folder whose first batch holds an object array instead of bytes."""
    shutil.copytree(cifar, dest)
    batch = pickle.loads((dest / "data_batch_1").read_bytes(), encoding="bytes")
    batch[b"data"] = np.array(["x"] * 3, dtype=object)
    (dest / "data_batch_1").write_bytes(pickle.dumps(batch))
    return dest


def _damaged_copy(run: Path, dest: Path, name: str, content) -> Path:
    shutil.copytree(run, dest)
    if isinstance(content, dict):
        content = json.dumps({**json.loads((dest / name).read_text()), **content})
    if content is not None:
        (dest / name).write_text(content)
    return dest


# (id, command with {placeholders} for the fixtures, what the one line must say)
CASES = [
    ("missing data", "data info --data {root}/missing", "does not exist"),
    ("unknown layout", "data info --data {layout}", "unknown data layout"),
    ("one class", "data info --data {one-class}", "needs at least two classes"),
    ("csv naming a missing file", "data info --data {root}/bad.csv", "nowhere.png"),
    ("object-dtype pickle", "data info --data {objects}", "not a readable CIFAR batch"),
    ("image size 0", "data info --data {cifar} --image-size 0", "not a size like"),
    ("image size 100000", "summary --model seed --image-size 100000", "larger than 4096"),
    ("image size 3000x3000, dense net", "train --data {cifar} --image-size 3000x3000 --dry-run --out {root}/o1",
     "would have over 4,608,000,000 parameters"),
    ("image too small for the net", "train --data {cifar} --model airbench-s --image-size 8 --out {root}/o2",
     "at least 16x16"),
    ("seed 2**70", f"train --data {{cifar}} --seed {2**70} --out {{root}}/o3", "seed must be from 0"),
    ("lr inf", "train --data {cifar} --lr inf", "finite number"),
    ("lr nan", "train --data {cifar} --lr nan", "finite number"),
    ("epochs 0", "train --data {cifar} --epochs 0", "epochs"),
    ("batch size -1", "train --data {cifar} --batch-size -1", "batch-size"),
    ("val split 1.5", "train --data {cifar} --val-split 1.5", "below 1"),
    ("unknown preset", "train --data {cifar} --preset bogus", "unknown preset 'bogus'"),
    ("unknown model", "train --data {cifar} --model bogus", "unknown model 'bogus'"),
    ("absurd layer spec", "train --data {cifar} --model c99999999 --out {root}/o4", "c99999999"),
    ("unknown augmentation", "train --data {cifar} --augment bogus --out {root}/o5", "unknown augmentation"),
    ("class names of the wrong count", "train --data {cifar} --class-names a,b --out {root}/o6", "gives 2 names"),
    ("--out is a file", "train --data {cifar} --out {root}/a-file", "is a file"),
    ("--out holds the user's files", "train --data {cifar} --out {root}/full", "not a cnnlab run"),
    ("--resume of a folder that is no run", "train --resume {layout}", "no config.json"),
    ("evaluate a missing run", "evaluate {root}/nope", "does not exist"),
    ("evaluate a folder without weights", "evaluate {layout}", "has no weights"),
    ("config.json saved as []", "evaluate {config-list}", "config.json"),
    ("config.json saved as {}", "report {config-empty}", "config.json"),
    ("config.json of wrong types", "train --resume {config-types}", "config.json"),
    ("model.json asking for 40000x40000", "evaluate {model-huge}", "not what cnnlab training writes"),
    ("model.json with classes as a string", "predict {model-classes} {root}/notes.png", "not what cnnlab"),
    ("model.json that is not JSON", "export {model-text}", "model.json"),
    ("weights with a flipped bit", "export {flipped}", "is damaged"),
    ("predict a file that is no image", "predict {run} {root}/notes.png", "notes.png"),
    ("predict a missing file", "predict {run} {root}/missing.png", "missing.png"),
    ("serve --max-upload-mb inf", "serve {run} --max-upload-mb inf", "finite number"),
    ("serve --port 99999", "serve {run} --port 99999", "port"),
    ("runs of a missing folder", "runs {root}/nothing-here", "does not exist"),
    ("an unknown command", "fly", "invalid choice"),
    ("pretrained file missing", "train --data {cifar} --model resnet18_imagenet --pretrained {root}/none.pth",
     "no such file"),
    ("pretrained file of another kind", "train --data {cifar} --model resnet18_imagenet --pretrained {root}/notes.png",
     ".pth, .pt or .safetensors"),
    ("imagenet weights of a CIFAR net", "train --data {cifar} --model resnet20 --pretrained imagenet",
     "has no ImageNet weights"),
    ("a frozen body from random weights", "train --data {cifar} --preset finetune --pretrained none",
     "needs trained weights"),
    ("head-only from random weights", "train --data {cifar} --model resnet20 --head-only", "needs trained weights"),
    ("head-only on a net without an embedding", "train --data {cifar} --model resnet20 --head-only --init-from {run}",
     "defines its embedding"),
    ("lr-spread below 1", "train --data {cifar} --preset finetune --lr-spread 0.5", "lr-spread"),
    ("freezing every epoch", "train --data {cifar} --preset finetune --freeze-epochs 5 --epochs 5",
     "must leave some"),
    ("pretrained weights that do not fit", "train --data {cifar} --model resnet18_imagenet --image-size 32 "
     "--pretrained {run}/model.safetensors --out {root}/o7", "does not fit this network"),
]


@pytest.mark.parametrize("command,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_exit_2(world, capsys, command, match):
    argv = [part.format_map({k: str(v) for k, v in world.items()}) for part in command.split()]
    before = sorted(p.name for p in world["root"].iterdir())
    capsys.readouterr()
    code = _main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cnnlab: error: "), (code, err)
    assert match in err[0], err[0]
    assert sorted(p.name for p in world["root"].iterdir()) == before  # no run directory or file left behind


def _main(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit through SystemExit
        return e.code


def _unprivileged(*args: str, env: dict) -> subprocess.CompletedProcess:
    """Run cnnlab as a user who cannot read mode-000 files: ourselves, or `nobody` when we are root (root
    reads everything)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a mode-000 file stays readable")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run([*prefix, sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_unreadable_folders_and_files_are_named_in_one_line(world):
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="cnnlab-mode000-"))  # not under pytest's folder, which only we may enter
    try:
        root.chmod(0o755)
        images = write_image_folder(root / "images")
        run = Path(shutil.copytree(world["run"], root / "run"))
        for locked in (images / "train" / "b", run / "model.safetensors"):
            locked.chmod(0)
        env = {**os.environ, "HOME": str(root), "CNNLAB_CACHE": str(root / "cache"),
               "PYTHONPATH": str(Path(cli.__file__).parents[2])}
        proc = _unprivileged("data", "info", "--data", str(images), env=env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"cnnlab: error: cannot use {images}/train/b: Permission denied"]
        proc = _unprivileged("evaluate", str(run), env=env)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "model.safetensors" in proc.stderr and "Permission denied" in proc.stderr  # not "no weights"
    finally:
        (root / "images" / "train" / "b").chmod(0o755)
        shutil.rmtree(root)


def test_a_damaged_run_is_listed_as_such_beside_the_good_ones(world, capsys):
    assert cli.main(["runs", str(world["root"])]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "(damaged)" in rows["config-list"]  # a config.json saved as []: it used to end the whole listing
    assert "(damaged)" not in rows["run"] and "seed" in rows["run"]


def test_a_cache_entry_the_disk_cannot_hold_is_refused_before_decoding(world, capsys, monkeypatch):
    from cnnlab.data import cache

    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    assert cli.main(["data", "info", "--data", str(world["cifar"]), "--image-size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(180 of 64x64) need 2 MB" in err[0] and "has 1 MB free" in err[0], err
    decoded = cache.sources.cache_dir() / "decoded"
    assert not [p for p in decoded.iterdir() if p.name.startswith(".building")]


def test_a_reader_that_leaves_ends_the_command_quietly(world):
    """`cnnlab data info ... | head -1`: the pipe closes before cnnlab writes; no "internal error: BrokenPipeError"."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "data", "info", "--data", str(world["cifar"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b""
