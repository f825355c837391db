"""BatchNorm statistics: which running averages cannot keep up with a run, the exact statistics that replace
them before validation, and the warning when validation stays at chance while training climbs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cnnlab import logs, models, training
from cnnlab.config import DataConfig, TrainConfig
from cnnlab.data.dataset import Normalization
from cnnlab.training import batchnorm


def test_layers_whose_averages_an_epoch_cannot_renew():
    with torch.device("meta"):
        mobilenet, resnet = models.build("mobilenet_v3_large", 3, 8), models.build("resnet18_imagenet", 3, 8)
    assert batchnorm.lagging(mobilenet, 15) == [0.01]  # 0.99^15: 86% of the epoch's start is still there
    assert batchnorm.lagging(mobilenet, 391) == []  # a CIFAR-10 epoch at batch 128 renews them
    assert batchnorm.lagging(resnet, 8) == [0.1] and batchnorm.lagging(resnet, 29) == []
    assert batchnorm.lagging(nn.Sequential(nn.BatchNorm2d(3, momentum=None)), 10_000) == [0.0]
    assert batchnorm.lagging(nn.Sequential(nn.Conv2d(3, 3, 1)), 1) == []


def test_recompute_gives_the_exact_statistics_and_changes_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.01), nn.Dropout(0.5), nn.Flatten())
    model.eval()
    x = torch.randint(0, 256, (12, 3, 5, 5), dtype=torch.uint8)
    norm = Normalization()
    rng = torch.get_rng_state()
    batchnorm.recompute(model, x, norm, torch.device("cpu"), torch.float32, batch_size=6)
    with torch.no_grad():
        features = model[0](norm(x)).transpose(0, 1).reshape(4, -1)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, features.mean(1))
    halves = [features.view(4, 2, -1)[:, i].var(1) for i in range(2)]  # (equal batches: their average)
    torch.testing.assert_close(bn.running_var, (halves[0] + halves[1]) / 2)
    assert bn.momentum == 0.01 and not model.training and not bn.training
    assert torch.equal(torch.get_rng_state(), rng)  # dropout stayed off: no random number was drawn


def test_sample_is_fixed_and_made_of_whole_batches():
    a, b = batchnorm.sample(5000, 64, seed=3), batchnorm.sample(5000, 64, seed=3)
    assert torch.equal(a, b) and len(a) == 1024 - 1024 % 64 and len(set(a.tolist())) == len(a)
    assert len(batchnorm.sample(45, 16, 0)) == 32 and len(batchnorm.sample(1, 16, 0)) == 0


def _colour(root, name, rgb, n):
    rng = np.random.default_rng(len(name))
    (root / name).mkdir(parents=True)
    for i in range(n):
        arr = np.clip(np.array(rgb) + rng.normal(0, 10, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / name / f"{i}.png")


def test_validation_at_chance_while_training_climbs_is_warned_about_once(tmp_path):
    """val/ holds each class's images under another class's name: training learns, validation cannot."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
    names = list(colours)
    for i, name in enumerate(names):
        _colour(tmp_path / "d" / "train", name, colours[name], 10)
        _colour(tmp_path / "d" / "val", name, colours[names[(i + 1) % 3]], 4)
        _colour(tmp_path / "d" / "test", name, colours[name], 2)
    cfg = TrainConfig(epochs=4, batch_size=10, precision="fp32", threads=2)  # the tutorial's network, Adam
    with logs.captured() as lines:
        training.train(cfg, DataConfig(path=str(tmp_path / "d")), out=tmp_path / "run", with_report=False)
    warnings = [line for line in lines if "is at chance" in line]
    assert len(warnings) == 1 and "(33.3%, the largest class's share)" in warnings[0], "\n".join(lines)


@pytest.mark.parametrize("batch, said", [
    (4, []),  # 38 steps an epoch at momentum 0.1 renew the averages
    (50, ["BatchNorm statistics: computed on 150 training images before each validation (momentum 0.1 cannot "
          "renew the running averages in 3 steps an epoch)"]),
])
def test_the_log_says_when_statistics_are_computed(tmp_path, cifar_python_dir, batch, said):
    cfg = TrainConfig(model="resnet20", epochs=1, batch_size=batch, precision="fp32", threads=2)
    with logs.captured() as lines:
        training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / "run", with_report=False)
    assert [line for line in lines if line.startswith("BatchNorm statistics")] == said
