"""The controls practitioners expect: best weights and early stopping (Keras' ModelCheckpoint(save_best_only) and
EarlyStopping(restore_best_weights)) kept bit-exact across resume; extending a finished run; settings files;
learning-rate schedules; EMA, gradient clipping, accumulation and class weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cnnlab import cli, logs, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.errors import Interrupted
from cnnlab.run import Run
from cnnlab.training.loop import Hook
from conftest import CtrlCAt

# 150 training images, 30 held out for validation: 8 steps an epoch of batch 16
CFG = TrainConfig(epochs=6, batch_size=16, seed=3)
VAL_LOSSES = [2.0, 1.5, 1.2, 1.4, 1.3, 1.25]  # best at epoch 3, then three epochs without improvement


class Scripted(Hook):
    """Each epoch's validation loss from VAL_LOSSES (the real pass runs too, for its logits and timing): after
    Validate (order 20), before the history is written and the best epoch decided (Monitor, 60)."""
    order = 25

    def end_epoch(self, fit) -> None:
        fit.record["val_loss"] = VAL_LOSSES[fit.record["epoch"] - 1]


def _train(tmp_path, name, cfg, val_split=0.2, hooks=(), **kw) -> tuple:
    data = DataConfig(path=kw.pop("data"), val_split=val_split)
    with logs.captured() as lines:
        run = training.train(cfg, data, out=tmp_path / name, with_report=False, hooks=[Scripted(), *hooks])
    return run, "\n".join(lines)


def test_early_stopping_restores_the_best_epoch(tmp_path, cifar_python_dir):
    run, log = _train(tmp_path, "es", TrainConfig(**{**CFG.__dict__, "early_stopping": 2}), data=str(cifar_python_dir))
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]  # epochs 4 and 5 did not beat epoch 3
    assert "early stopping: val_loss has not improved for 2 epochs (best: epoch 3)" in log
    assert "model.safetensors holds epoch 3's weights (best: early stopping)" in log
    best, final = load_file(run / "best.safetensors"), load_file(run / "model.safetensors")
    assert all(torch.equal(best[k], final[k]) for k in best)
    meta = json.loads((run / "model.json").read_text())
    assert meta["epoch"] == 3 and meta["best_epoch"] == 3
    assert Run(run).load_checkpoint()["epoch"] == CFG.epochs  # finished: --resume says "is complete"


def test_the_tutorial_keeps_the_last_epoch_but_names_the_best(tmp_path, cifar_python_dir):
    cfg = TrainConfig(**{**CFG.__dict__, "keep": "last"})
    run, log = _train(tmp_path, "last", cfg, data=str(cifar_python_dir))
    assert "best epoch: 3 (val_loss 1.2000); model.safetensors holds epoch 6's weights (last: --keep last)" in log
    assert json.loads((run / "model.json").read_text())["epoch"] == 6
    assert not torch.equal(*(load_file(run / f)["conv1.weight"] for f in ("best.safetensors", "model.safetensors")))


def test_auto_keeps_the_last_epoch_when_the_validation_set_is_the_test_set(tmp_path, cifar_python_dir):
    run, log = _train(tmp_path, "auto", CFG, val_split=None, data=str(cifar_python_dir))
    assert "holds epoch 6's weights (last: the validation set is the test set)" in log
    run, log = _train(tmp_path, "held-out", CFG, data=str(cifar_python_dir))  # a held-out set: the best
    assert "holds epoch 3's weights (best: validated on held-out images)" in log


def test_monitor_val_acc_and_the_flags(tmp_path, cifar_python_dir, capsys):
    run = tmp_path / "cli"
    assert cli.main(["train", "--data", str(cifar_python_dir), "--epochs", "3", "--batch-size", "16",
                     "--val-split", "0.2", "--monitor", "val_acc", "--early-stopping", "5", "--keep", "best",
                     "--no-report", "--out", str(run)]) == 0
    history = json.loads((run / "history.json").read_text())
    best = max(history, key=lambda h: h["val_acc"])  # the first of equals
    assert f"best epoch: {best['epoch']} (val_acc {best['val_acc']:.4f})" in capsys.readouterr().out
    assert json.loads((run / "model.json").read_text())["epoch"] == best["epoch"]


def test_resume_keeps_the_best_epoch_and_the_patience_count(tmp_path, cifar_python_dir):
    cfg = TrainConfig(**{**CFG.__dict__, "early_stopping": 2})
    whole, _ = _train(tmp_path, "whole", cfg, data=str(cifar_python_dir))
    with pytest.raises(Interrupted):  # mid-epoch 5: after the best epoch (3) and one worse epoch (4)
        _train(tmp_path, "cut", cfg, data=str(cifar_python_dir), hooks=[CtrlCAt(8 * 4 + 3)])
    training.resume(tmp_path / "cut", hooks=[Scripted()])
    assert (whole / "model.safetensors").read_bytes() == (tmp_path / "cut" / "model.safetensors").read_bytes()
    (a, epoch_a), (b, epoch_b) = (Run(d).load_best() for d in (whole, tmp_path / "cut"))
    assert epoch_a == epoch_b == 3 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_extended_to_the_weights_of_a_longer_one(tmp_path, cifar_python_dir, capsys):
    """`--resume RUN --epochs 3` on a finished 2-epoch run (the seed preset's constant schedule) ends with the
    weights a 3-epoch run has."""
    flags = ["--data", str(cifar_python_dir), "--batch-size", "30", "--no-report"]
    assert cli.main(["train", *flags, "--epochs", "3", "--out", str(tmp_path / "three")]) == 0
    assert cli.main(["train", *flags, "--epochs", "2", "--out", str(tmp_path / "two")]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "two"), "--epochs", "3", "--no-report"]) == 0
    assert "2 -> 3 epochs" in capsys.readouterr().out
    two, three = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("two", "three"))
    assert two == three
    assert len(json.loads((tmp_path / "two" / "history.json").read_text())) == 3
    assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["epochs"] == 3


@pytest.mark.parametrize("extra,message", [
    (["--epochs", "4"], "follows a triangle learning-rate schedule"),
    (["--epochs", "4", "warmup"], "follows a 0.2 warm-up learning-rate schedule"),
    (["--epochs", "1", "--lr", "0.5"], "--lr cannot apply"),
    (["--model", "resnet20"], "--model cannot apply"),
])
def test_what_resume_cannot_honour_is_an_error(tmp_path, cifar_python_dir, capsys, extra, message):
    run, warmup = tmp_path / "run", extra[-1] == "warmup"  # a constant schedule, but a warm-up of 20% of the steps
    recipe = ["--schedule", "constant", "--warmup", "0.2"] if warmup else ["--preset", "quick"]
    assert cli.main(["train", "--data", str(cifar_python_dir), *recipe, "--epochs", "1", "--batch-size",
                     "30", "--no-report", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), *extra[:2 if warmup else None]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 1  # nothing changed


def test_a_run_cannot_be_cut_below_what_it_trained(tmp_path, cifar_python_dir, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(cifar_python_dir), "--epochs", "2", "--batch-size", "30", "--no-report",
                     "--out", str(run)]) == 0
    assert cli.main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "has already trained 2 epochs" in capsys.readouterr().err


def test_a_preset_as_a_file_round_trips_and_flags_override_it(tmp_path, capsys, cifar_python_dir):
    from cnnlab import presets
    from cnnlab.presets import from_toml

    assert cli.main(["presets", "--show", "fast"]) == 0
    text = capsys.readouterr().out
    assert "lr = 11.5  # per 1024 examples" in text and "# init_from: not set" in text
    path = tmp_path / "fast.toml"
    path.write_text(text)
    assert from_toml(str(path), presets.get("seed")) == presets.get("fast")  # the file, not the preset it replaced
    path.write_text('preset = "quick"\nepochs = 2\nlabel-smoothing = 0.05\nmonitor = "val_acc"\n')
    cfg = from_toml(str(path), presets.get("seed"))
    assert (cfg.model, cfg.epochs, cfg.label_smoothing, cfg.monitor) == ("airbench-s", 2, 0.05, "val_acc")
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(cifar_python_dir), "--config", str(path), "--epochs", "1",
                     "--batch-size", "30", "--no-report", "--out", str(run)]) == 0  # the flag beats the file
    out = capsys.readouterr().out
    assert "1 epoch of 5 steps" in out and "lr 11.5 per 1024 examples (0.04395 a step at batch 30)" in out
    recorded = json.loads((run / "config.json").read_text())["train"]
    assert (recorded["epochs"], recorded["label_smoothing"], recorded["monitor"]) == (1, 0.05, "val_acc")


@pytest.mark.parametrize("content,message", [("epochz = 3\n", "unknown setting(s) epochz"),
                                             ('lr = "fast"\n', "lr = 'fast' is not a valid"),
                                             ("epochs = [\n", "cannot read config file"),
                                             ('schedule = "cosinus"\n', "schedule")])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, cifar_python_dir, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert cli.main(["train", "--data", str(cifar_python_dir), "--config", str(path), "--out",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


def _factors(schedule: str, total: int = 100, **kw) -> list[float]:
    from cnnlab.training.optim import make_schedule

    cfg = TrainConfig(schedule=schedule, **kw)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, out = make_schedule(cfg, opt, total), []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_shapes():
    cos = _factors("cosine", warmup=0.1, lr_end=0.01)
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0) and cos[10] == pytest.approx(1.0)
    assert cos[55] == pytest.approx(0.01 + 0.99 * 0.5, abs=0.02) and cos[-1] == pytest.approx(0.01, abs=1e-3)
    step = _factors("step")
    assert (step[49], step[50], step[74], step[75], step[99]) == pytest.approx((1, 0.1, 0.1, 0.01, 0.01))
    one = _factors("one-cycle", warmup=0.25, lr_start=0.04, lr_end=0.001)
    assert one[0] == pytest.approx(0.04) and max(one) == pytest.approx(1.0) and one.index(max(one)) == 25
    assert one[-1] == pytest.approx(0.001, abs=1e-3) and all(a >= b for a, b in zip(one[25:], one[26:], strict=False))
    tri = _factors("triangle", warmup=0.5, lr_start=0.2, lr_end=0.0)
    assert tri[25] == pytest.approx(0.6) and tri[75] == pytest.approx(0.5)


def test_plateau_drops_the_rate_after_two_flat_epochs_and_resumes_exactly():
    from cnnlab.training.optim import make_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_schedule(TrainConfig(schedule="plateau", monitor="val_loss"), opt, 100)
    for loss in (1.0, 0.9, 0.95, 0.93):  # best 0.9, then two epochs without improving: x0.1
        sched.epoch_end(loss)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    again = make_schedule(TrainConfig(schedule="plateau"), opt, 100)
    again.load_state_dict(sched.state_dict())
    again.epoch_end(0.92)
    again.epoch_end(0.91)  # still not below 0.9: a second drop
    opt.step()
    again.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize("schedule", ["one-cycle", "cosine", "step", "plateau"])
def test_every_schedule_trains_from_the_command_line(tmp_path, cifar_python_dir, schedule):
    run = tmp_path / schedule
    assert cli.main(["train", "--data", str(cifar_python_dir), "--epochs", "2", "--batch-size", "30", "--optimizer",
                     "sgd", "--lr", "0.05", "--schedule", schedule, "--warmup", "0.2", "--no-report",
                     "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["schedule"] == schedule


def _cli_run(tmp_path, name, data, *flags) -> dict:
    run = tmp_path / name
    assert cli.main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "30", "--precision", "fp32",
                     "--no-report", "--out", str(run), *flags]) == 0
    return load_file(run / "model.safetensors")


def test_accumulated_slices_make_the_same_step(tmp_path, cifar_python_dir):
    """One step of 30 images, whole or in 3 slices of 10. The seed model has no BatchNorm: slicing changes only
    the order of additions. (Over several steps those rounding differences grow wherever a ReLU's input
    crosses zero: after 5 steps they reached 1e-4 with PyTorch's AVX2 kernels against 3e-8 with AVX-512's, so
    one step is what can be compared within rounding.)"""
    one_step = ("--optimizer", "sgd", "--lr", "0.05", "--subset", "30")
    whole = _cli_run(tmp_path, "whole", cifar_python_dir, *one_step)
    sliced = _cli_run(tmp_path, "sliced", cifar_python_dir, *one_step, "--accumulate", "3")
    start = _cli_run(tmp_path, "start", cifar_python_dir, *one_step[:2], "--lr", "1e-12", *one_step[4:])
    for k in whole:
        assert not torch.allclose(whole[k], start[k], atol=1e-4)  # the step moved every tensor
        torch.testing.assert_close(sliced[k], whole[k], atol=1e-6, rtol=1e-5)
    assert cli.main(["train", "--data", str(cifar_python_dir), "--batch-size", "30", "--accumulate", "4"]) == 2


def test_clipped_gradients_bound_each_step(tmp_path, cifar_python_dir):
    start = _cli_run(tmp_path, "none", cifar_python_dir, "--optimizer", "sgd", "--lr", "1e-9", "--momentum", "0")
    clipped = _cli_run(tmp_path, "clip", cifar_python_dir, "--optimizer", "sgd", "--lr", "1", "--momentum", "0",
                       "--clip-grad", "0.001")
    moved = torch.sqrt(sum(((clipped[k] - start[k]) ** 2).sum() for k in start))
    assert 0.001 < moved <= 5 * 0.001 * 1.0001  # 5 steps of at most lr x 0.001 each; more than one step's worth


def test_ema_weights_are_validated_and_kept(tmp_path, cifar_python_dir):
    final = _cli_run(tmp_path, "ema", cifar_python_dir, "--ema", "0.5", "--optimizer", "sgd", "--lr", "0.05")
    state = Run(tmp_path / "ema").load_checkpoint()
    assert all(torch.equal(final[k], state["ema"][k]) for k in final)
    assert not all(torch.equal(final[k], state["model"][k]) for k in final)  # not the raw weights
    plain = _cli_run(tmp_path, "plain", cifar_python_dir, "--optimizer", "sgd", "--lr", "0.05")
    assert all(torch.equal(plain[k], state["model"][k]) for k in plain)  # the average never feeds back


def test_resume_with_ema_is_bit_exact(tmp_path, cifar_python_dir):
    cfg = TrainConfig(epochs=2, batch_size=30, ema=0.9, optimizer="sgd", lr=0.05, clip_grad=1.0, accumulate=2,
                      class_weights="auto", precision="fp32")
    data = DataConfig(path=str(cifar_python_dir))
    whole = training.train(cfg, data, out=tmp_path / "whole", with_report=False)
    with pytest.raises(Interrupted):
        training.train(cfg, data, out=tmp_path / "cut", with_report=False, hooks=[CtrlCAt(7)])  # mid-epoch 2
    training.resume(tmp_path / "cut")
    assert (whole / "model.safetensors").read_bytes() == (tmp_path / "cut" / "model.safetensors").read_bytes()


def test_class_weights_make_every_class_count_the_same():
    from cnnlab.data.dataset import class_weights

    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    weight = class_weights(y, 3)
    assert weight.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert (weight * torch.bincount(y)).tolist() == pytest.approx([10 / 3] * 3)  # each class weighs the same


def test_lr_find_sweeps_stops_on_divergence_suggests_and_restores(tmp_path, cifar_python_dir, capsys):
    from cnnlab import data, models
    from cnnlab.training import lrfind

    ds = data.load(DataConfig(path=str(cifar_python_dir)))
    model = models.build("seed", 3, 10, (32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(optimizer="sgd", momentum=0.9, batch_size=30)
    result = lrfind.find_lr(cfg, ds, start=1e-5, end=1e3, steps=60, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # put back as it was
    assert len(result.lrs) < 60  # plain SGD at lr 1000 diverges: the sweep stopped
    assert result.lrs == sorted(result.lrs) and result.lrs[1] / result.lrs[0] == pytest.approx((1e3 / 1e-5) ** (1 / 59))
    lowest = result.lrs[result.losses.index(min(result.losses))]
    assert result.suggestion == pytest.approx(lowest / 10) and result.flag_value == result.suggestion
    out = tmp_path / "lr.png"
    assert cli.main(["lr-find", "--data", str(cifar_python_dir), "--preset", "quick", "--steps", "20",
                     "--batch-size", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per 1024 examples" in printed and out.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["lr-find", "--data", str(cifar_python_dir), "--start", "1", "--end", "0.1"]) == 2


@pytest.mark.parametrize("preset", ["quick", "fast", "standard", "photos", "finetune"])
def test_the_controls_on_every_preset_family(tmp_path, cifar_python_dir, preset):
    """EMA (BatchNorm buffers copied), accumulation (BatchNorm sees slices), clipping, class weights, a cosine
    schedule, MixUp and RandAugment, early stopping and the best epoch kept: on each family's network, CIFAR
    arrays for the CIFAR recipes, a photo folder (48 px) for `photos`, and for `finetune` a pretrained weights
    file, one frozen epoch, then one of everything at 32 px."""
    from cnnlab import models, presets
    from conftest import write_image_folder

    data = (write_image_folder(tmp_path / "photos", per_class=16, size=(48, 48)) if preset == "photos"
            else cifar_python_dir)
    extra = []
    if preset == "finetune":
        weights = tmp_path / "backbone.pth"
        torch.save(models.build(presets.get("finetune").model, 3, 1000, (32, 32)).state_dict(), weights)
        extra = ["--pretrained", str(weights), "--image-size", "32"]
    run = tmp_path / f"run-{preset}"
    assert cli.main(["train", "--data", str(data), "--preset", preset, *extra, "--epochs", "2", "--batch-size", "20",
                     "--val-split", "0.25", "--ema", "0.9", "--accumulate", "2", "--clip-grad", "2.0",
                     "--class-weights", "auto", "--schedule", "cosine", "--warmup", "0.1", "--early-stopping", "3",
                     "--augment", "flip+randaugment+mixup", "--no-report", "--out", str(run)]) == 0
    meta = json.loads((run / "model.json").read_text())
    best, _ = Run(run).load_best()
    final = load_file(run / "model.safetensors")
    assert meta["epoch"] == meta["best_epoch"] and all(torch.equal(best[k], final[k]) for k in final)
    state = Run(run).load_checkpoint()
    assert state["ema"] is not None and state["epoch"] == 2
