"""Faults: checkpoints that survive SIGKILL, damage and full disks; non-finite losses; bad image files;
pickles that try to run code."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from cnnlab import cli, data, logs, models, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.data import cachedir
from cnnlab.errors import CnnlabError, Interrupted
from cnnlab.run import Run
from conftest import CtrlCAt, Fault, fake_cifar_arrays, write_cifar_python, write_image_folder

# ---------------------------------------------------------------------------------------------------
# Checkpoints


def sample_state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 2), value), "half": torch.ones(4, dtype=torch.bfloat16) * value},
            "optimizer": {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"betas": (0.9, 0.99),
                                                                                     "lr": 1e-3, "params": [0]}]},
            "moment": torch.arange(96.0).view(2, 3, 4, 4).contiguous(memory_format=torch.channels_last),
            "epoch": 2, "step": 0, "epoch_rng": None, "history": [{"val_acc": 0.5}], "flag": True}


def test_checkpoint_round_trip_keeps_every_type(tmp_path):
    Run(tmp_path).save_checkpoint(sample_state(1.5))
    state = Run(tmp_path).load_checkpoint()
    assert torch.equal(state["model"]["w"], torch.full((3, 2), 1.5))
    assert state["model"]["half"].dtype == torch.bfloat16
    assert list(state["optimizer"]["state"]) == [0]  # int keys stay ints
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)  # tuples stay tuples
    assert state["epoch_rng"] is None and state["history"] == [{"val_acc": 0.5}] and state["flag"] is True
    moment = sample_state(0)["moment"]  # fused optimizers read moments as flat memory: the layout must survive
    assert torch.equal(state["moment"], moment) and state["moment"].stride() == moment.stride() != (48, 16, 4, 1)
    raw = (tmp_path / Run.CHECKPOINT).read_bytes()
    assert b"__reduce__" not in raw and raw[8:9] == b"{"  # safetensors: a JSON header, no pickle


def test_previous_checkpoint_is_kept_and_used_when_the_latest_is_damaged(tmp_path):
    Run(tmp_path).save_checkpoint(sample_state(1.0))
    Run(tmp_path).save_checkpoint(sample_state(2.0))
    assert Run(tmp_path).load_checkpoint()["model"]["w"][0, 0] == 2.0
    latest = tmp_path / Run.CHECKPOINT
    raw = bytearray(latest.read_bytes())
    raw[-3] ^= 0xFF  # one flipped bit pattern in the tensor data: only the checksum can notice
    latest.write_bytes(bytes(raw))
    with logs.captured() as said:
        state = Run(tmp_path).load_checkpoint()
    assert state["model"]["w"][0, 0] == 1.0
    assert "checksum mismatch" in said[0] and "resuming from the previous checkpoint" in said[0]
    latest.write_bytes(latest.read_bytes()[:100])  # truncated: the header no longer parses
    assert Run(tmp_path).load_checkpoint()["model"]["w"][0, 0] == 1.0
    (tmp_path / Run.PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(CnnlabError, match="no usable checkpoint"):
        Run(tmp_path).load_checkpoint()
    assert Run(tmp_path / "nothing-here").load_checkpoint() is None


def test_a_failed_checkpoint_write_keeps_the_old_one_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    Run(tmp_path).save_checkpoint(sample_state(1.0))

    def disk_full(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(CnnlabError, match="cannot write .*checkpoint.safetensors: No space left on device"):
        Run(tmp_path).save_checkpoint(sample_state(2.0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [Run.CHECKPOINT]
    assert Run(tmp_path).load_checkpoint()["model"]["w"][0, 0] == 1.0


def test_unwritable_or_full_destinations_fail_before_training(tmp_path, capsys, monkeypatch, cifar_python_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["train", "--data", str(cifar_python_dir), "--out", str(blocker / "run"), "--epochs", "1"]) == 2
    assert "cannot create the run directory" in capsys.readouterr().err

    import shutil
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(cifar_python_dir), "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "has 1 MB free but this run's checkpoints needs about" in err and err.count("\n") == 1
    assert not list(out.glob("checkpoint*")) and not (out / "history.csv").exists()


# ---------------------------------------------------------------------------------------------------
# SIGKILL at random moments, then --resume: the same final weights as a run never interrupted


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_weights(tmp_path, cifar_python_dir):
    flags = ["--data", str(cifar_python_dir), "--epochs", "12", "--batch-size", "10", "--checkpoint-every", "4",
             "--no-report", "--seed", "3"]
    cmd = [sys.executable, "-m", "cnnlab"]
    subprocess.run([*cmd, "train", *flags, "--out", str(tmp_path / "reference")], check=True, timeout=300,
                   capture_output=True)
    run = tmp_path / "killed"
    rng = random.Random(7)
    kills = 0
    proc = subprocess.Popen([*cmd, "train", *flags, "--out", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while kills < 4:
        if kills == 0:
            time.sleep(rng.uniform(0.5, 1.5))  # during start-up, before the first checkpoint
        else:  # mid-training: at a random moment after this process's first checkpoint, however fast the machine
            started = time.time()
            checkpoint = run / Run.CHECKPOINT
            while proc.poll() is None and not (checkpoint.exists() and checkpoint.stat().st_mtime > started):
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.25))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        for name in (Run.CHECKPOINT, Run.PREVIOUS):
            if (run / name).exists():
                Run(run).load_checkpoint()  # whatever is there is whole and checks out
        # killed before the run directory was set up, the original command starts it again; after, --resume
        again = ["--resume", str(run), "--no-report"] if (run / "config.json").exists() else [*flags, "--out", str(run)]
        proc = subprocess.Popen([*cmd, "train", *again], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == 0
    assert not list(run.glob(".*.tmp"))  # writes cut short by a kill are cleared away on resume
    assert kills >= 3, "the run finished before it could be killed three times; lengthen it"
    want, got = load_file(tmp_path / "reference" / "model.safetensors"), load_file(run / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] == pytest.approx(
        json.loads((tmp_path / "reference" / "metrics.json").read_text())["test_accuracy"])


# ---------------------------------------------------------------------------------------------------
# Non-finite loss


class GoesNaN(nn.Module):
    """A working network whose output turns to NaN from the `after`-th training forward pass on."""

    def __init__(self, in_channels: int, num_classes: int, after: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, num_classes))
        self.after, self.calls = after, 0

    def forward(self, x):
        self.calls += self.training
        out = self.net(x)
        return out * float("nan") if self.training and self.calls >= self.after else out


@pytest.mark.parametrize("mode", ["stop", "skip-batch"])
def test_non_finite_loss(tmp_path, registered, mode):
    registered.register("goes_nan")(lambda c, k, s: GoesNaN(c, k, after=6))  # 4 steps an epoch: epoch 2, step 2
    root = write_image_folder(tmp_path / "set", per_class=4, size=(8, 8))  # 12 images, batch 3
    cfg = TrainConfig(model="goes_nan", epochs=2, batch_size=3, on_nan=mode)
    out = tmp_path / "run"
    if mode == "stop":
        with pytest.raises(CnnlabError, match=r"non-finite at epoch 2, step 2; .*checkpoint .* kept.* --lr 0\.0001"):
            training.train(cfg, DataConfig(path=str(root)), out=out)
        state = Run(out).load_checkpoint()
        assert state["epoch"] == 1 and state["step"] == 0  # the end of epoch 1: the last good state
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert not (out / "model.safetensors").exists()
    else:
        with logs.captured() as said:
            training.train(cfg, DataConfig(path=str(root)), out=out, with_report=False)
        assert any("3 batches of epoch 2 were skipped" in str(s) for s in said)
        weights = load_file(out / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------------
# Bad input files


def broken_folder(tmp_path) -> Path:
    root = write_image_folder(tmp_path / "set", per_class=6, size=(8, 8))
    good = (root / "train" / "a" / "000.png").read_bytes()
    (root / "train" / "a" / "cut.png").write_bytes(good[:40])  # truncated
    (root / "train" / "b" / "notes.jpg").write_text("not a picture")
    (root / "test" / "c" / "empty.png").write_bytes(b"")
    Image.new("L", (5000, 5000)).save(root / "train" / "c" / "bomb.png")  # 25 megapixels in a few KB
    return root


def test_bad_image_files_are_all_listed(tmp_path):
    root = broken_folder(tmp_path)
    with pytest.raises(CnnlabError) as info:
        data.load_dataset(root)
    message = str(info.value)
    assert message.startswith("4 unreadable image file(s)") and "--skip-bad-images" in message
    for name in ("cut.png", "notes.jpg", "empty.png", "bomb.png: 5000x5000 pixels is over the limit"):
        assert name in message


def test_skip_bad_images_trains_and_records_them(tmp_path, capsys):
    root = broken_folder(tmp_path)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--skip-bad-images", "--epochs", "1", "--batch-size", "4",
                     "--out", str(out), "--no-report"]) == 0
    assert "warning: skipped 4 unreadable image file(s)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["data"]
    assert len(config["skipped_images"]) == 4 and config["train_images"] == 18 and config["test_images"] == 9
    assert cli.main(["evaluate", str(out)]) == 0  # evaluation reads the data the same way


def test_malicious_pickles_never_run(tmp_path, cifar_batches):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = write_cifar_python(tmp_path / "cifar-10-batches-py", cifar_batches)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=2))
    cifar100 = tmp_path / "c100" / "cifar-100-python"
    cifar100.mkdir(parents=True)
    for name in ("train", "test"):
        (cifar100 / name).write_bytes(pickle.dumps(Payload(), protocol=4))
    (cifar100 / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"]}, protocol=2))
    for path in (folder, cifar100):
        with pytest.raises(CnnlabError, match="refusing to load posix.system"):
            data.load_dataset(path, use_cache=False)
    assert not marker.exists()


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, cifar_python_dir):
    cfg, data_cfg = TrainConfig(epochs=2, batch_size=16, seed=1), DataConfig(path=str(cifar_python_dir))
    whole = training.train(cfg, data_cfg, out=tmp_path / "whole", with_report=False)

    killed = Fault("after_epoch", KeyboardInterrupt(), order=35)  # dies where it would write its first checkpoint
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg, data_cfg, out=tmp_path / "cut", with_report=False, hooks=[killed])
    assert (tmp_path / "cut" / "config.json").exists() and Run(tmp_path / "cut").load_checkpoint() is None
    with logs.captured() as said:
        training.resume(tmp_path / "cut", with_report=False)
    assert any("no checkpoint yet" in str(s) for s in said)
    want, got = load_file(whole / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)


# ---------------------------------------------------------------------------------------------------
# The end of a run: a kill after any of its files, damaged weights, SIGTERM

END_OF_RUN = ["model.safetensors", "model.json", *Run.END_FILES, *Run.PICTURES]
# Runs `cnnlab train` in this process, SIGKILLing it as soon as the N-th file of the end of the run is complete
# (files.atomic_path has renamed it into place): what a kill between two files leaves.
KILLER = """
import os, signal, sys
from pathlib import Path
from cnnlab import cli, files
after, names, real = int(sys.argv[1]), sys.argv[2].split(","), files.atomic_path.__wrapped__
def counting(path, *a, **k):
    gen = real(path, *a, **k)
    tmp = next(gen)
    try:
        yield tmp
    except BaseException as e:
        gen.throw(e)
    next(gen, None)
    done = [n for n in names if (Path(path).parent / n).exists()]
    if Path(path).name in names and len(done) >= after:
        os.kill(os.getpid(), signal.SIGKILL)
files.atomic_path = files.contextmanager(counting)
cli.main(sys.argv[3:])
"""


def _end_of_run_files(run: Path) -> dict[str, bool]:
    return {name: (run / name).exists() for name in END_OF_RUN}


def test_a_kill_after_any_file_of_the_end_of_a_run_is_completed_by_resume(tmp_path, cifar_python_dir):
    flags = ["--data", str(cifar_python_dir), "--epochs", "1", "--batch-size", "30", "--seed", "3", "--threads", "1"]
    assert cli.main(["train", *flags, "--out", str(tmp_path / "reference")]) == 0
    want = load_file(tmp_path / "reference" / "model.safetensors")
    # killed after the 1st ... 6th file (the 7th ends the run anyway): the six runs at once, a thread each (their
    # startup, not their arithmetic, is what costs: one at a time took 80 s of the suite)
    procs = {after: subprocess.Popen([sys.executable, "-c", KILLER, str(after), ",".join(END_OF_RUN), "train",
                                      *flags, "--out", str(tmp_path / f"killed-{after}")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for after in range(1, len(END_OF_RUN))}
    for after, proc in procs.items():
        run = tmp_path / f"killed-{after}"
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        assert list(_end_of_run_files(run).values()) == [True] * after + [False] * (len(END_OF_RUN) - after)
        assert cli.main(["train", "--resume", str(run)]) == 0
        assert all(_end_of_run_files(run).values()), after
        got = load_file(run / "model.safetensors")
        assert all(torch.equal(want[k], got[k]) for k in want), after
        assert Run(run).model_complete()


def test_damaged_weights_are_refused_by_every_reader_and_rewritten_by_resume(tmp_path, cifar_python_dir, capsys):
    from cnnlab import deploy
    from cnnlab.deploy import export, pytorch
    from cnnlab.evaluation import evaluate

    run = tmp_path / "run"
    flags = ["--data", str(cifar_python_dir), "--epochs", "1", "--batch-size", "30", "--no-report"]
    assert cli.main(["train", *flags, "--out", str(run)]) == 0
    want = {k: v.clone() for k, v in load_file(run / "model.safetensors").items()}  # not a view of the file
    blob = bytearray((run / "model.safetensors").read_bytes())
    blob[-3] ^= 0x40  # one flipped exponent bit in the last weight
    (run / "model.safetensors").write_bytes(bytes(blob))
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (9, 99, 199)).save(image)
    for read in (lambda: evaluate.evaluate_run(run), lambda: deploy.predict_files(run, [str(image)]),
                 lambda: export.export_onnx(run, tmp_path / "m.onnx"), lambda: pytorch.TorchPredictor(run)):
        with pytest.raises(CnnlabError, match="is damaged"):
            read()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0  # written again from the final checkpoint
    got = load_file(run / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert cli.main(["train", "--resume", str(run), "--no-report"]) == 0
    assert "is complete: all 1 epoch trained, its weights verified" in capsys.readouterr().out


def test_sigterm_stops_like_ctrl_c_with_a_checkpoint(tmp_path, cifar_python_dir):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "train", "--data", str(cifar_python_dir), "--epochs",
                             "200", "--batch-size", "10", "--no-report", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = run / Run.CHECKPOINT
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:  # the first epoch has ended
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM: stopping after this step and saving a checkpoint" in out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    state = Run(run).load_checkpoint()
    assert state is not None and state["epoch"] + state["step"] > 0 and state["epoch"] < 200


# ---------------------------------------------------------------------------------------------------
# Small things that used to go wrong


def test_flag_errors_are_one_line(tmp_path):
    for args, message in ((["train", "--epochs", "0"], "--epochs: must be at least 1"),
                          (["train", "--lr", "inf"], "--lr: must be a finite number above 0"),
                          (["bogus"], "invalid choice: 'bogus'"), (["data"], "required: SUBCOMMAND")):
        proc = subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0] and "--help" in lines[0], args
    with pytest.raises(CnnlabError, match="lr must be a finite number"):
        TrainConfig(lr=float("nan")).validate()


def test_out_must_be_new_or_empty_and_a_refused_run_leaves_nothing(tmp_path, cifar_python_dir):
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("do not overwrite")
    with pytest.raises(CnnlabError, match="folder of other files"):
        training.train(TrainConfig(epochs=1), DataConfig(path=str(cifar_python_dir)), out=mine)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    refused = Fault("before_fit", CnnlabError("no space"))  # refused after config.json, before any checkpoint
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(CnnlabError, match="no space"):
            training.train(TrainConfig(epochs=1), DataConfig(path=str(cifar_python_dir)), out=out, hooks=[refused])
        assert not out.exists() if out.name == "new" else not any(out.iterdir())  # the command can simply run again


@pytest.mark.parametrize("order", [5, 95], ids=["before-ctrl-c-hook", "after-ctrl-c-hook"])
def test_a_hook_that_fails_leaves_the_signal_handlers_and_no_run(tmp_path, cifar_python_dir, order):
    """A hook that fails as training starts, before or after the Ctrl-C hook installed its handlers: the error
    is the hook's, the process' handlers are what they were, and the refused run leaves nothing."""
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(CnnlabError, match="refused by a hook"):
        training.train(TrainConfig(epochs=1), DataConfig(path=str(cifar_python_dir)), out=tmp_path / "run",
                       hooks=[Fault("before_fit", CnnlabError("refused by a hook"), order=order)])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert not (tmp_path / "run").exists()


def test_a_killed_decode_leaves_nothing_that_stays(tmp_path):
    write_image_folder(tmp_path / "imgs", per_class=3, size=(8, 8))
    decoded = Path(os.environ["CNNLAB_CACHE"]) / "decoded"
    decoded.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace("-", "_")
    abandoned = decoded / f".building-{host}-{dead.stdout.strip()}-x1"  # what a SIGKILL mid-decode leaves
    (abandoned / "train.u8").parent.mkdir()
    (abandoned / "train.u8").write_bytes(b"\0" * 100)
    alive = decoded / f"{cachedir.building_prefix()}x2"  # a decode still running in this process: left alone
    # another machine's decode in a shared cache folder (its process id means nothing here): left alone
    elsewhere = decoded / f".building-othermachine-{dead.stdout.strip()}-x3"
    for folder in (alive, elsewhere):
        folder.mkdir()
    data.load_dataset(tmp_path / "imgs")
    assert not abandoned.exists() and alive.exists() and elsewhere.exists()
    for folder in (alive, elsewhere):  # these "decodes" end with the test: other tests look for half-built
        folder.rmdir()  # entries left anywhere


def test_a_second_process_waits_for_the_first_decode_instead_of_decoding_twice(tmp_path):
    """A second process that loads the same folder while a first is decoding it waits for the first and maps its
    entry: it says so and decodes nothing."""
    write_image_folder(tmp_path / "imgs", per_class=1000, size=(128, 128))  # seconds of decoding, resized to 96
    decoded = Path(os.environ["CNNLAB_CACHE"]) / "decoded"
    # Both start at once; the second, its imports done, waits for the first's building folder, then loads. (Started
    # only once that folder existed, on a machine with two busy processes it was still importing torch when the
    # first had finished.)
    code = ("import sys, time; from pathlib import Path; from cnnlab import data, logs\n"
            "from cnnlab.data import decode\n"
            "while sys.argv[2] != '-' and not list(Path(sys.argv[2]).glob('.building-*')): time.sleep(0.005)\n"
            "with logs.captured() as said:\n"
            "    data.load_dataset(sys.argv[1])\nprint(decode.decoded(), any('waiting' in s for s in said))")
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "imgs"), "-"], stdout=subprocess.PIPE,
                             text=True)
    second = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "imgs"), str(decoded)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert first.communicate(timeout=300)[0].split() == ["4500", "False"]  # 1,000 train + 500 test per class
    out, err = second.communicate(timeout=300)
    assert out.split() == ["0", "True"], err[-2000:]


def test_training_on_no_images_is_an_error(tmp_path):
    empty = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    ds = data.Dataset(empty, torch.zeros(0, dtype=torch.int64), empty, torch.zeros(0, dtype=torch.int64), ["a", "b"],
                      "image-folder", str(tmp_path), "none")
    with pytest.raises(CnnlabError, match="no training images"):
        training.train(TrainConfig(epochs=1), dataset=ds, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    cifar = write_cifar_python(root / "cifar", fake_cifar_arrays())
    run = root / "run"
    assert cli.main(["train", "--data", str(cifar), "--dry-run", "--out", str(run), "--no-report"]) == 0
    return run


@pytest.mark.parametrize("content", ["[]", "{}", '{"train": 5, "data": "x"}', '{"train": {"epochs": "x"}, "data": {}}'])
@pytest.mark.parametrize("command", ["evaluate", "report", "resume"])
def test_a_damaged_config_json_is_a_one_line_error(finished_run, tmp_path, capsys, content, command):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "config.json").write_text(content)
    capsys.readouterr()
    code = cli.main(["train", "--resume", str(run)] if command == "resume" else [command, str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cnnlab: error: "), err


@pytest.mark.parametrize("change", [{"image_size": [40000, 40000]}, {"in_channels": 7}, {"classes": "abc"}])
def test_a_damaged_model_json_is_refused_before_building_anything(finished_run, tmp_path, change):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CnnlabError, match="is not what cnnlab training writes"):
        models.load_model(run)


def test_a_seed_beyond_what_generators_take_and_absurd_image_sizes_are_refused():
    with pytest.raises(CnnlabError, match="seed must be from 0 to 4294967295"):
        TrainConfig(seed=2**70).validate()
    with pytest.raises(CnnlabError, match="image size must be 1 to 4096 px per side"):
        DataConfig(image_size=(40000, 40000)).validate()


def test_a_symbolic_link_loop_in_an_image_folder_reads_each_image_once(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2, size=(8, 8))
    os.symlink(root / "train" / "a", root / "train" / "a" / "loop")
    ds = data.load_dataset(root)
    assert torch.bincount(ds.y_train).tolist() == [2, 2, 2]


def test_class_names_that_look_like_formulas_are_drawn_as_written(tmp_path, cifar_python_dir):
    names = ["a$\\notacmd$", "$x^2$", *[f"c{i}" for i in range(8)]]
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(cifar_python_dir), "--dry-run", "--class-names", ",".join(names),
                     "--out", str(run)]) == 0
    assert (run / "report.html").exists() and (run / "confusion_matrix.png").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_outputs_that_are_devices_or_fifos_are_written_through_and_others_refused(tmp_path):
    """Writing to a temporary name and renaming it over the target would replace a device or FIFO (run as
    root, /dev/null itself): character devices and FIFOs are written through, as the shell's `>` would; a
    folder or socket is refused in one line; none is replaced."""
    import socket
    import threading

    from cnnlab import files

    files.write_text("/dev/null", "x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if os.path.exists("/dev/full"):
        with pytest.raises(CnnlabError, match="cannot write /dev/full: No space left"):
            files.write_json("/dev/full", {"a": 1})
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    files.write_text(fifo, "through the pipe")
    reader.join(10)
    assert got == ["through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(CnnlabError, match="is a socket"):
            files.write_text(sock_path, "x")
    with pytest.raises(CnnlabError, match="is a folder"):
        files.write_text(tmp_path, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "s.sock"]


def test_a_full_disk_while_decoding_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The pixel file's space is reserved before decoding (a sparse file filled through a mapping dies with
    SIGBUS when the disk fills); a disk that cannot reserve it, or fills while the small files are written, is
    one line naming the way out, and no half-built entry stays."""
    import errno

    write_image_folder(tmp_path / "imgs", per_class=4, size=(8, 8))
    decoded = Path(os.environ["CNNLAB_CACHE"]) / "decoded"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CnnlabError, match="no room for .* on its disk: free some space, or set CNNLAB_CACHE"):
        data.load_dataset(tmp_path / "imgs")
    assert not list(decoded.glob(".building-*"))
    monkeypatch.undo()

    def full_json(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_json)
    with pytest.raises(CnnlabError, match="filled up while decoding"):
        data.load_dataset(tmp_path / "imgs")
    monkeypatch.undo()
    assert not list(decoded.glob(".building-*"))
    assert len(data.load_dataset(tmp_path / "imgs").y_train) == 12  # and with room, it simply works


def test_a_checkpoint_of_another_network_is_one_line(tmp_path, cifar_python_dir, capsys):
    """A checkpoint copied in from a run of another network (both interrupted after their first checkpoint)."""
    for model, out in (("seed", "a"), ("c8-p-f-d10", "b")):
        with pytest.raises(Interrupted):
            training.train(TrainConfig(model=model, epochs=3, batch_size=30, checkpoint_every=2),
                           DataConfig(path=str(cifar_python_dir)), out=tmp_path / out, hooks=[CtrlCAt(3)],
                           with_report=False)
    for name in (Run.CHECKPOINT, Run.PREVIOUS):
        if (tmp_path / "b" / name).exists():
            (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the checkpoint does not fit this run's network" in err[0], err


def test_resuming_a_no_report_run_writes_no_report(tmp_path, cifar_python_dir):
    """The run's own choice is kept: `--resume` alone does not add the report a `--no-report` run left out."""
    with pytest.raises(Interrupted):
        training.train(TrainConfig(epochs=2, batch_size=30), DataConfig(path=str(cifar_python_dir)),
                       out=tmp_path / "r", hooks=[CtrlCAt(7)], with_report=False)
    assert cli.main(["train", "--resume", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "metrics.json").is_file() and not (tmp_path / "r" / "report.html").exists()
