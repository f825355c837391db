"""The standard architectures, the layer-spec grammar, user-registered models and fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import cli, logs, models, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.errors import CnnlabError
from cnnlab.models import spec
from cnnlab.training import finetune
from conftest import write_image_folder

# Parameter counts for 32x32x3 inputs and 10 classes, as published (zoo.py says where each comes from).
PUBLISHED = {"resnet20": 0.27e6, "resnet56": 0.85e6, "resnet18": 11.17e6, "vgg11_bn": 9.23e6, "wrn16_4": 2.75e6,
             "mobilenetv2": 2.24e6, "seed": 545_098}
ALL = sorted(models.MODELS)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    count = models.count_params(models.build(name, 3, 10, (32, 32)), trainable_only=False)
    assert abs(count - PUBLISHED[name]) <= 0.01 * PUBLISHED[name], count


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 96, 80)])  # the last: a photo-sized input
def test_every_model_trains_forward_and_backward(name, shape):
    torch.manual_seed(0)
    if name == "convnext_tiny" and shape[1] < 32:  # four halvings after a stride-4 stem: 28 px would reach 0
        with pytest.raises(CnnlabError, match="at least 32x32"):
            models.build(name, shape[0], 7, shape[1:])
        return
    model = models.build(name, shape[0], 7, shape[1:])
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(64, *shape))
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 7) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2, 6])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_the_tutorial_network_as_a_spec_matches_seed():
    net = models.build("c32-p-c64-p-f-d128", 3, 10, (32, 32))
    assert models.count_params(net) == models.count_params(models.build("seed")) == 545_098
    assert [p.shape for p in net.parameters()] == [p.shape for p in models.build("seed").parameters()]


def test_spec_layers_do_what_the_grammar_says():
    net = spec.build("c16k5s2b-a-c8-g-r0.5-d32", 1, 4, (28, 28))
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d", "Conv2d", "ReLU", "AdaptiveAvgPool2d",
                     "Flatten", "Dropout", "Linear", "ReLU", "Linear"]
    conv = net[0]
    assert conv.kernel_size == (5, 5) and conv.stride == (2, 2) and conv.bias is None  # BatchNorm replaces the bias
    assert net[8].p == 0.5 and net[-1].out_features == 4
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    assert spec.build("c8-p3", 3, 2, (9, 9))(torch.randn(1, 3, 9, 9)).shape == (1, 2)  # implicit flatten


@pytest.mark.parametrize("bad, message", [
    ("c32-q", "layer 2 'q' is not one of"),
    ("c32--p", "empty layer"),
    ("c32-", "empty layer"),
    ("f-c32", "flattened it"),
    ("d10", "flatten (f or g) before a dense layer"),
    ("p-p-p-p-p-p", "cannot pool 1x1 by 2"),
    ("r1.5", "dropout must be at least 0 and below 1"),
    ("c0", "at least 1"),
    ("c32k0", "at least 1"),
    ("c8s40-p", "cannot pool 1x1 by 2"),  # a stride of 40 leaves one pixel
])
def test_bad_specs_name_the_layer(bad, message):
    with pytest.raises(CnnlabError, match="bad model spec") as info:
        models.build(bad, 3, 10, (32, 32))
    assert message in str(info.value) and "c<N>" in str(info.value)


def test_unknown_names_and_specs_fail_before_any_data_is_read(capsys, tmp_path):
    for model, message in (("resnet99", "unknown model 'resnet99'"), ("c32-x", "layer 2 'x'")):
        code = cli.main(["train", "--model", model, "--data", str(tmp_path / "no-such-data")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "no-such-data" not in err and err.count("\n") == 1


def test_models_command_lists_every_model_and_the_grammar(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ALL) and "11,173,962" in out and "spec  := layer" in out


class Tiny(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean((2, 3)))


def test_users_register_their_own_model_and_train_it_by_name(tmp_path, registered):  # taken out after the test

    @models.register("tiny")
    def tiny(in_channels, num_classes, image_size):
        return Tiny(in_channels, num_classes)

    root = write_image_folder(tmp_path / "set", per_class=8, size=(8, 8))
    run = training.train(TrainConfig(model="tiny", epochs=1, batch_size=8), DataConfig(path=str(root)),
                      out=tmp_path / "run", with_report=False)
    model, meta = models.load_model(run)
    assert meta["model"] == "tiny" and isinstance(model, Tiny) and meta["params"] == 8 * 3 * 9 + 8 + 8 * 3 + 3
    with pytest.raises(CnnlabError, match="already registered"):
        models.register("tiny")(lambda c, k, s: Tiny(c, k))
    models.register("tiny", replace=True)(lambda c, k, s: Tiny(c, k + 1))
    assert models.build("tiny", 3, 2).head.out_features == 3
    with pytest.raises(CnnlabError, match="reads as a layer spec"):
        models.register("c32")
    models.register("broken")(lambda c, k, s: "not a module")
    with pytest.raises(CnnlabError, match="returned str, not a Module"):
        models.build("broken")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("a") / "three", classes=("a", "b", "c"), per_class=10,
                              size=(16, 16))
    return training.train(TrainConfig(epochs=1, batch_size=8), DataConfig(path=str(root)),
                       out=tmp_path_factory.mktemp("runs") / "source", with_report=False)


def test_fine_tuning_with_a_new_head(source_run, tmp_path):
    before = models.load_model(source_run)[0].state_dict()
    fresh = models.build("seed", 3, 5, (16, 16))
    message = finetune.init_from(fresh, "seed", source_run)
    assert "new classifier head (3 -> 5 classes)" in message
    after = fresh.state_dict()
    for key in ("conv1.weight", "conv2.bias", "dense1.weight"):
        assert torch.equal(after[key], before[key])
    assert after["dense2.weight"].shape == (5, 128)

    root = write_image_folder(tmp_path / "five", classes=("v", "w", "x", "y", "z"), per_class=6, size=(16, 16))
    with logs.captured() as lines:
        run = training.train(TrainConfig(epochs=1, batch_size=8, init_from=str(source_run)), DataConfig(path=str(root)),
                             out=tmp_path / "tuned", with_report=False)
    assert any("new classifier head (3 -> 5 classes)" in str(line) for line in lines)
    assert json.loads((run / "config.json").read_text())["train"]["init_from"] == str(source_run)
    same = models.build("seed", 3, 3, (16, 16))
    assert "all 8 tensors copied" in finetune.init_from(same, "seed", source_run)


def test_fine_tuning_a_different_architecture_is_a_clear_error(source_run, tmp_path, capsys):
    with pytest.raises(CnnlabError, match="that run trained 'seed', this one is 'resnet20'"):
        finetune.init_from(models.build("resnet20", 3, 3), "resnet20", source_run)
    with pytest.raises(CnnlabError, match="do not fit this model .*dense1.weight"):
        finetune.init_from(models.build("seed", 3, 3, (32, 32)), "seed", source_run)  # trained at 16x16
    root = write_image_folder(tmp_path / "set", per_class=4, size=(16, 16))
    code = cli.main(["train", "--data", str(root), "--model", "resnet20", "--init-from", str(source_run),
                     "--epochs", "1", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "same architecture" in err and err.count("\n") == 1
    code = cli.main(["train", "--data", str(root), "--init-from", str(tmp_path / "nothing"), "--epochs", "1"])
    assert code == 2 and "--init-from needs a finished training run" in capsys.readouterr().err
