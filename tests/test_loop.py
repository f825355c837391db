"""The rebuilt loop: no host read inside a step, one every SYNC_EVERY steps, non-finite steps that change
nothing, and a configuration checked whole before any data is read."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cnnlab import cli, presets, training
from cnnlab.config import DataConfig, TrainConfig, override
from cnnlab.errors import CnnlabError
from cnnlab.training import loop
from cnnlab.training.loop import Hook

# What makes a host wait for the device: reading a value back (on a GPU each is a sync point).
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every host read of a tensor's value from here on."""
    count = {"n": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            count["n"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


class CountReads(Hook):
    """Host reads between the loop's events: from the start of an epoch to each step's end, and from the start of
    an epoch to its end (before validation: order 0 runs first)."""
    order = 0

    def __init__(self, host_reads):
        self.host_reads, self.between_steps, self.in_epochs, self.mark = host_reads, [], [], 0

    def before_epoch(self, fit):
        self.start = self.mark = self.host_reads["n"]

    def after_step(self, fit):  # what the batch, the step and the sync after the step before read
        self.between_steps.append(self.host_reads["n"] - self.mark)
        self.mark = self.host_reads["n"]

    def end_epoch(self, fit):
        self.in_epochs.append(self.host_reads["n"] - self.start)


@pytest.mark.parametrize("preset", ["seed", "quick", "standard"])
def test_a_step_never_reads_the_device_and_an_epoch_reads_it_every_sync_every_steps(
        tmp_path, cifar_python_dir, host_reads, preset):
    cfg = override(presets.get(preset), epochs=2, batch_size=4, model="resnet20" if preset == "standard" else None)
    steps = math.ceil(150 / 4)  # 38 steps an epoch on the 150 fake images
    counter = CountReads(host_reads)
    training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / "r", with_report=False,
                   hooks=[counter])
    # after a step at a multiple of SYNC_EVERY the host reads the totals once; the batches and steps never read
    synced_before = [i > 0 and i % loop.SYNC_EVERY == 0 for i in range(steps)] * 2
    assert counter.between_steps == [int(s) for s in synced_before], counter.between_steps
    syncs = math.ceil(steps / loop.SYNC_EVERY)  # at each SYNC_EVERY-th step and at the last one
    assert counter.in_epochs == [syncs + 1, syncs + 1], (counter.in_epochs, syncs)  # + the end of the epoch's read


class Blows(nn.Module):
    """BatchNorm then a linear layer; its output is NaN while `nan` is set."""

    def __init__(self):
        super().__init__()
        self.norm, self.head, self.nan = nn.BatchNorm2d(3), nn.Linear(3, 2), False

    def forward(self, x):
        out = self.head(self.norm(x).mean((2, 3)))
        return out * float("nan") if self.nan else out


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "muon"])
def test_a_non_finite_step_changes_no_weight_statistic_or_optimizer_state(optimizer, tmp_path):
    from cnnlab.data.dataset import Normalization
    from cnnlab.training.optim import Lookahead, make_optimizer, make_schedule
    from cnnlab.training.state import TrainState
    from cnnlab.training.step import Step

    torch.manual_seed(0)
    model = Blows()
    cfg = TrainConfig(optimizer=optimizer, lr=0.1, on_nan="skip-batch", lookahead=True)
    opt = make_optimizer(cfg, model)
    ts = TrainState(model, opt, make_schedule(cfg, opt, 10), torch.amp.GradScaler("cpu", enabled=False),
                    Lookahead(model, 10), Normalization(), torch.device("cpu"))
    step = Step(cfg, torch.device("cpu"), torch.float32, steps_per_epoch=10)
    step.wrap(model)
    xb, yb = torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1])
    for i in range(4):  # a few good steps (the 5th would be a lookahead step too)
        step(ts, xb, yb, i)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    model.nan = True
    step(ts, xb, yb, 4)  # step 5: also the lookahead's turn
    after = model.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    opt_after = {k: v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    assert all(torch.equal(opt_before[k], opt_after[k]) for k in opt_before)
    assert ts.read()["skipped"] == 1 and ts.read()["first_bad_step"] == 4 and ts.read()["seen"] == 16
    model.nan = False
    step(ts, xb, yb, 5)
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])  # good steps go on


@pytest.mark.parametrize("bad, message", [
    (dict(optimizer="adamx"), "unknown optimizer 'adamx'; use one of: adam, adamw, sgd, muon"),
    (dict(schedule="cosinus"), "unknown schedule 'cosinus'"),
    (dict(augment="sed"), "unknown augmentation 'sed'"),
    (dict(model="resnet21"), "unknown model 'resnet21'"),
    (dict(on_nan="ignore"), "unknown on-nan 'ignore'"),
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(device="gpu"), "unknown device 'gpu'"),
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(label_smoothing=1.5), "label-smoothing must be below 1"),
    (dict(tta=3), "tta must be 0, 1 or 2"),
])
def test_a_bad_config_fails_before_reading_data_or_making_the_run_directory(tmp_path, bad, message):
    out = tmp_path / "run"
    with pytest.raises(CnnlabError, match=message):  # the data path does not exist either: config comes first
        training.train(TrainConfig(**bad), DataConfig(path=str(tmp_path / "no-such-data")), out=out)
    assert not out.exists()


def test_the_command_line_checks_the_config_before_the_data(tmp_path, capsys):
    code = cli.main(["train", "--data", str(tmp_path / "missing"), "--augment", "sed", "--out", str(tmp_path / "r")])
    assert code == 2 and "unknown augmentation 'sed'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_gradient_scaler_path_trains_and_skips_non_finite_steps(tmp_path, cifar_python_dir, monkeypatch):
    """fp16 with loss scaling is the path of older GPUs; PyTorch runs it on the CPU as well, so it is tested here."""
    from safetensors.torch import load_file

    cfg = TrainConfig(epochs=1, batch_size=30, precision="fp16", on_nan="skip-batch")
    run = training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / "r", with_report=False)
    weights = load_file(run / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    import json

    assert json.loads((run / "model.json").read_text())["precision"] == "fp16"


@pytest.mark.parametrize("preset", ["seed", "quick"])
def test_the_final_metrics_are_the_last_validation_without_a_second_pass(tmp_path, cifar_python_dir, monkeypatch,
                                                                         preset):
    import json

    from cnnlab.evaluation import evaluate

    passes, real = [], evaluate.predict_logits

    def counted(model, x, *args, **kwargs):
        passes.append(len(x))
        return real(model, x, *args, **kwargs)
    monkeypatch.setattr(evaluate, "predict_logits", counted)
    cfg = override(presets.get(preset), epochs=2, batch_size=30)
    run = training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / "r", with_report=False)
    assert passes == [30, 30]  # one pass over the 30 test images per epoch, none after training
    history, metrics = (json.loads((run / f).read_text()) for f in ("history.json", "metrics.json"))
    assert metrics["test_accuracy"] == pytest.approx(history[-1]["val_acc"], abs=1e-9)
    assert metrics["test_loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    assert all(h["val_seconds"] > 0 for h in history)
    fresh = evaluate.evaluate_run(run)  # a separate evaluation of the saved weights agrees
    assert fresh["test_accuracy"] == metrics["test_accuracy"]
    assert fresh["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)


def test_a_held_out_validation_set_still_gets_one_test_pass_at_the_end(tmp_path, cifar_python_dir, monkeypatch):
    from cnnlab.evaluation import evaluate

    passes, real = [], evaluate.predict_logits
    monkeypatch.setattr(evaluate, "predict_logits", lambda m, x, *a, **k: passes.append(len(x)) or real(m, x, *a, **k))
    training.train(TrainConfig(epochs=2, batch_size=30), DataConfig(path=str(cifar_python_dir), val_split=0.2),
                out=tmp_path / "r", with_report=False)
    assert passes == [30, 30, 30]  # 30 held-out images after each epoch, then the 30 test images once


def test_val_sample_validates_on_a_fixed_sample_and_the_last_epoch_on_all(tmp_path, cifar_python_dir, monkeypatch):
    from cnnlab.evaluation import evaluate

    seen, real = [], evaluate.predict_logits
    monkeypatch.setattr(evaluate, "predict_logits", lambda m, x, *a, **k: seen.append(x.clone()) or real(m, x, *a, **k))
    training.train(TrainConfig(epochs=3, batch_size=30, val_sample=10), DataConfig(path=str(cifar_python_dir)),
                out=tmp_path / "r", with_report=False)
    assert [len(x) for x in seen] == [10, 10, 30] and torch.equal(seen[0], seen[1])  # the same 10 each time
