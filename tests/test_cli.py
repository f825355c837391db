"""The command line: every subcommand works, and bad input gives one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnnlab import cli
from conftest import write_image_folder


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_data_info(capsys, cifar_tar):
    code, out, _ = run_cli(capsys, "data", "info", "--data", cifar_tar)
    assert code == 0 and "format:      cifar-python" in out and "official test set" in out


def test_summary_with_and_without_data(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "summary", "--model", "seed")
    assert code == 0 and "Total params: 545,098" in out
    root = write_image_folder(tmp_path / "g", classes=("a", "b"), per_class=2, size=(8, 8), mode="L")
    code, out, _ = run_cli(capsys, "summary", "--data", root)
    # 1 channel, 8x8, 2 classes: 320 + 18,496 + (64*2*2)*128+128 + 128*2+2
    assert code == 0 and f"Total params: {320 + 18_496 + 256 * 128 + 128 + 258:,}" in out


def test_presets_listed(capsys):
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0 and out.startswith("seed: ") and "seed-aug: " in out and "augment=seed" in out


def test_the_docs_name_each_presets_own_schedule():
    """The preset list of the training guide says which learning-rate schedule each recipe follows: the one it
    has."""
    import re
    from pathlib import Path

    from cnnlab import presets

    readme = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    bullets = dict(re.findall(r"^- `([a-z-]+)` — (.*?)(?=^- `|^$)", readme, re.M | re.S))
    assert set(presets.PRESETS) <= set(bullets)
    schedules = ("one-cycle", "triangle", "cosine", "plateau", "step schedule", "constant")
    for name, text in bullets.items():
        said = {s for s in schedules if s in " ".join(text.split())}
        assert said <= {presets.get(name).schedule}, (name, said)


def test_predict_help_names_the_csv_header_it_writes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    # what _write_predictions_csv writes
    assert "`filename,label,confidence,` `class_1,probability_1,...,error`" in help_text


def test_train_dry_run_evaluate_and_predict(capsys, tmp_path, cifar_python_dir):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--data", cifar_python_dir, "--dry-run", "--preset", "seed-aug",
                             "--batch-size", "32", "--out", out_dir)
    assert code == 0, err
    config = json.loads((out_dir / "config.json").read_text())
    assert config["preset"] == "seed-aug" and config["train"]["augment"] == "seed"
    assert config["train"]["batch_size"] == 32 and config["train"]["epochs"] == 1
    assert config["data"]["subset"] == 512
    code, out, _ = run_cli(capsys, "evaluate", out_dir)
    assert code == 0 and "Test accuracy:" in out and "weighted avg" in out
    img = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img)
    code, out, _ = run_cli(capsys, "predict", out_dir, img, "--top-k", "2", "--json")
    result = json.loads(out)
    assert code == 0 and len(result[0]["predictions"]) == 2
    code, out, _ = run_cli(capsys, "predict", out_dir, img)
    assert code == 0 and out.startswith(f"{img}: ") and out.count(",") == 4  # 5 classes by default, as the server
    code, out, _ = run_cli(capsys, "predict", out_dir, img, "--json")
    assert set(json.loads(out)[0]) == {"filename", "label", "confidence", "predictions"}  # the server's words
    assert len(json.loads(out)[0]["predictions"]) == 5


def _bad_inputs(tmp_path, cifar_python_dir):
    empty_class = write_image_folder(tmp_path / "e", per_class=2, size=(4, 4))
    for f in (empty_class / "train" / "b").iterdir():
        f.unlink()
    truncated = write_image_folder(tmp_path / "t", per_class=2, size=(16, 16), ext=".jpg")
    victim = truncated / "train" / "a" / "001.jpg"
    victim.write_bytes(victim.read_bytes()[:60])
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (tmp_path / "layout").mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    garbage = tmp_path / "cifar-10-python.tar.gz"
    garbage.write_bytes(bytes(range(256)) * 4)
    return [
        (["data", "info", "--data", tmp_path / "missing"], "does not exist"),
        (["data", "info", "--data", tmp_path / "layout"], "unknown data layout"),
        (["data", "info", "--data", empty_class], "class folder .*/train/b has no images"),
        (["data", "info", "--data", truncated], "1 unreadable image file.*001.jpg"),
        (["evaluate", no_weights], "has no weights"),
        (["evaluate", tmp_path / "nope"], "does not exist"),
        (["predict", no_weights, not_image], "has no weights"),
        (["train", "--resume", no_weights], "no config.json"),
        (["train", "--preset", "bogus", "--data", cifar_python_dir], "unknown preset 'bogus'"),
        (["train", "--augment", "bogus", "--data", cifar_python_dir, "--out", tmp_path / "x"],
         "unknown augmentation 'bogus'"),
        # issue 31's hostile command lines: each was read forever, crashed, ran silently wrong or said the wrong thing
        (["train", "--config", "/dev/zero", "--dry-run"], "config file /dev/zero is not a regular file"),
        (["train", "--threads", "100000", "--dry-run"], "threads must be at most 1024"),
        (["train", "--data", "", "--dry-run"], "--data is empty"),
        (["train", "--data", "/dev/zero", "--dry-run"], "/dev/zero is a device, FIFO or socket"),
        (["train", "--data", cifar_python_dir, "--class-names", "a,a,b,c,d,e,f,g,h,i", "--dry-run"],
         "class-names repeats a"),
        (["train", "--data", cifar_python_dir, "--subset", "5", "--out", tmp_path / "s"],
         "--subset 5 is fewer images than the 10 classes"),
        (["train", "--data", cifar_python_dir, "--val-split", "0.99", "--out", tmp_path / "v"],
         "--val-split leaves .* classes without a training image"),
        (["train", "--data", cifar_python_dir, "--nproc", "3", "--batch-size", "64", "--out", tmp_path / "n"],
         "--batch-size 64 is the global batch and must divide evenly between 3 processes"),
        (["train", "--data", fifo, "--dry-run"], "is a device, FIFO or socket"),
        (["train", "--data", garbage, "--dry-run"], "cannot read archive .*: not a gzip, bzip2, xz or tar file$"),
    ]


def test_bad_input_gives_one_line_and_status_2(capsys, tmp_path, cifar_python_dir):
    import re
    for args, message in _bad_inputs(tmp_path, cifar_python_dir):
        code, out, err = run_cli(capsys, *args)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cnnlab: error: "), (args, err)
        assert re.search(message, lines[0]), (args, lines[0])
    assert not (tmp_path / "s").exists() and not (tmp_path / "v").exists()  # refused before any run directory


def test_predict_on_a_file_that_is_not_an_image(capsys, tmp_path, cifar_python_dir):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(cifar_python_dir), "--dry-run", "--out", str(run)]) == 0
    capsys.readouterr()
    (tmp_path / "notes.png").write_text("hello")
    code, _, err = run_cli(capsys, "predict", run, tmp_path / "notes.png")
    assert code == 2 and "is not an image" in err and "notes.png" in err
    code, _, err = run_cli(capsys, "predict", run, tmp_path / "absent.jpg")
    assert code == 2 and "absent.jpg does not exist" in err
    os.mkfifo(tmp_path / "pipe.png")  # opening it would wait for a writer forever
    code, _, err = run_cli(capsys, "predict", run, tmp_path / "pipe.png")
    assert code == 2 and "pipe.png is not a regular file" in err


@pytest.mark.parametrize("args", [["--epochs", "0"], ["--lr", "abc"], ["--subset", "-5"]])
def test_bad_flags_exit_2(capsys, args):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args])
    assert e.value.code == 2


def test_real_process_shows_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnnlab.cli", "evaluate", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"cnnlab: error: {tmp_path} has no weights (model.safetensors); " \
                                  "is it a finished training run?"


@pytest.mark.parametrize("argv", [["presets"], ["runs", "nowhere"], ["--help"], ["train", "--help"], ["--version"]])
def test_commands_that_need_no_tensors_never_import_torch(argv):
    code = ("import sys; from cnnlab import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert "torch imported: False" in out.stdout, out.stderr


def test_a_class_without_training_images_is_warned_about(tmp_path):
    """Legitimate but surprising data (a class only the test set has): trained, with a warning naming it."""
    from cnnlab import logs, presets, training
    from cnnlab.config import DataConfig, override
    from conftest import fake_cifar_arrays, write_cifar_python

    batches = fake_cifar_arrays()
    batches = [(x, [9 if v == 9 and k == 5 else (v if v != 9 else 8) for v in y])
               for k, (x, y) in enumerate(batches)]  # 9 (truck) only in the test batch
    data = write_cifar_python(tmp_path / "cifar-10-batches-py", batches)
    with logs.captured() as said:
        training.train(override(presets.get("seed"), epochs=1), DataConfig(path=str(data)), out=tmp_path / "r",
                       with_report=False)
    assert any("1 of 10 classes have no training image (truck)" in line for line in said), said
