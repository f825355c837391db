"""The tutorial's network, the model registry and summary, and the batch augmentation ops."""

from __future__ import annotations

import pytest
import torch

from cnnlab import models
from cnnlab.data import augment
from cnnlab.errors import CnnlabError


def test_seed_model_has_the_tutorials_parameter_count():
    model = models.build("seed", 3, 10, (32, 32))
    assert models.count_params(model) == 545_098
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_seed_model_takes_shape_and_classes_from_the_data():
    model = models.build("seed", 1, 4, (28, 20))
    assert model(torch.zeros(3, 1, 28, 20)).shape == (3, 4)
    # conv1 9*1*32+32, conv2 9*32*64+64, dense1 (64*7*5)*128+128, dense2 128*4+4
    assert models.count_params(model) == 320 + 18_496 + 2240 * 128 + 128 + 516


def test_seed_model_uses_keras_initialization():
    model = models.build("seed")
    w = model.conv1.weight
    limit = (6 / (3 * 9 + 32 * 9)) ** 0.5  # Glorot uniform: sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit
    assert torch.count_nonzero(model.conv1.bias) == 0


def test_summary_is_a_keras_style_table():
    text = models.summary(models.build("seed"), (3, 32, 32))
    lines = text.splitlines()
    assert lines[0].split() == ["Layer", "(type)", "Output", "Shape", "Param", "#"]
    row = next(ln for ln in lines if ln.startswith("dense1"))
    assert "(None, 128)" in row and row.endswith("524,416")
    assert "(None, 32, 32, 32)" in text and "Total params: 545,098" in text


def test_unknown_model_is_a_clear_error():
    with pytest.raises(CnnlabError, match="unknown model 'nope'.*seed"):
        models.build("nope")


def test_registry_accepts_new_models():
    @models.register("tiny-test")
    def tiny(c, k, size):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * size[0] * size[1], k))
    try:
        assert models.build("tiny-test", 1, 3, (2, 2))(torch.zeros(1, 1, 2, 2)).shape == (1, 3)
    finally:
        del models.MODELS["tiny-test"]


def _ramp(b=4, c=3, h=8, w=8):
    return torch.arange(w, dtype=torch.float32).expand(b, c, h, w).clone() / (w - 1)


def test_hflip_mirrors_exactly_the_chosen_images():
    x = _ramp(b=64)
    out = augment.hflip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 1.0)
    assert 10 < flipped.sum() < 54  # about half
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])


def test_affine_identity_shift_and_rotation_move_pixels_exactly():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    zero = torch.zeros(1)
    assert torch.allclose(augment.affine(x, zero, zero, zero), x, atol=1e-5)
    # shifting by a quarter of a 4-pixel width moves content by one pixel; the edge column is repeated
    shifted = augment.affine(x, zero, torch.tensor([0.25]), zero)
    assert torch.allclose(shifted[0, 0, :, 1:], x[0, 0, :, :3], atol=1e-5)
    assert torch.allclose(shifted[0, 0, :, 0], x[0, 0, :, 0], atol=1e-5)
    down = augment.affine(x, zero, zero, torch.tensor([0.25]))
    assert torch.allclose(down[0, 0, 1:], x[0, 0, :3], atol=1e-5)
    # a 90 degree turn of a square image lands exactly on pixel centres
    turned = augment.affine(x, torch.tensor([90.0]), zero, zero)
    assert torch.allclose(turned, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-4)


def test_affine_rotation_is_rigid_on_non_square_images():
    x = torch.zeros(1, 1, 9, 15)
    x[0, 0, 4, 3:12] = 1.0  # a horizontal bar through the centre, 9 pixels long
    turned = augment.affine(x, torch.tensor([90.0]), torch.zeros(1), torch.zeros(1))
    assert torch.allclose(turned[0, 0, :, 7], torch.ones(9), atol=1e-4)  # now vertical, still 9 long
    assert turned.sum().item() == pytest.approx(9.0, abs=1e-3)


def test_rotate_shift_draws_within_the_keras_ranges(monkeypatch):
    seen = {}

    def spy(x, angle, tx, ty):
        seen.update(angle=angle, tx=tx, ty=ty)
        return x
    monkeypatch.setattr(augment, "affine", spy)
    augment.rotate_shift(torch.zeros(4000, 1, 2, 2), torch.Generator().manual_seed(0), degrees=20, shift=0.2)
    assert seen["angle"].abs().max() <= 20 and seen["angle"].abs().max() > 19.9
    assert seen["tx"].abs().max() <= 0.2 and seen["ty"].abs().max() > 0.199
    assert abs(seen["angle"].mean()) < 1  # symmetric around zero


def test_keras_tutorial_augmentation_is_seeded_and_in_range():
    x = torch.rand(16, 3, 32, 32)
    a = augment.keras_tutorial(x, torch.Generator().manual_seed(5))
    b = augment.keras_tutorial(x, torch.Generator().manual_seed(5))
    c = augment.keras_tutorial(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1  # bilinear sampling with edge fill cannot leave the input range
    assert not torch.allclose(a, x)


def test_unknown_augmentation_is_a_clear_error():
    with pytest.raises(CnnlabError, match="unknown augmentation"):
        augment.get("bogus")


# ---------------------------------------------------------------------------------------------------
# The practitioners' augmentations: colour jitter, RandAugment, random erasing, MixUp, CutMix, combined


def test_every_new_operation_is_seeded_and_keeps_shape_and_range():
    from cnnlab.data import augment

    x = torch.rand(16, 3, 24, 24)
    for op in (augment.color_jitter, augment.rand_augment):
        a, b = (op(x, torch.Generator().manual_seed(1)) for _ in range(2))
        c = op(x, torch.Generator().manual_seed(2))
        assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
        assert a.min() >= 0 and a.max() <= 1  # colour operations work on [0, 1] pixels
    assert torch.allclose(augment.color_jitter(x, torch.Generator(), strength=0.0), x, atol=1e-6)
    erased = augment.random_erasing(x, torch.Generator().manual_seed(0), p=1.0)
    changed = (erased != x).any(1)  # (B, H, W): one rectangle per image, of one colour
    assert changed.flatten(1).any(1).all()
    for i in range(16):
        rows, cols = changed[i].nonzero().unbind(1)
        assert changed[i, rows.min():rows.max() + 1, cols.min():cols.max() + 1].float().mean() > 0.9


def test_mixup_and_cutmix_blend_labels_by_what_they_blend():
    from cnnlab.data import mix

    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])  # image i is all i
    y = torch.arange(6)
    mixed, soft = mix.mix(["mixup"], x, y, torch.Generator().manual_seed(0), 6)
    assert soft.sum(1).allclose(torch.ones(6)) and soft.shape == (6, 6)
    lam = soft.max(1).values  # image i = lam * i + (1 - lam) * partner: the label shares say the same
    partner = (soft * (soft < lam[:, None] - 1e-6)).argmax(1).float()
    assert torch.allclose(mixed[:, 0, 0, 0], lam * y.float() + (1 - lam) * partner, atol=1e-5)
    cut, soft = mix.mix(["cutmix"], x, y, torch.Generator().manual_seed(3), 6)
    own = (cut == x).float().mean((1, 2, 3))  # the share of each image left as it was
    assert not torch.equal(cut, x) and torch.allclose(soft[torch.arange(6), y], own, atol=1e-6)


def test_augmentations_combine_by_name_and_train(tmp_path, cifar_python_dir):
    from cnnlab import cli
    from cnnlab.data import augment

    with pytest.raises(CnnlabError, match="unknown augmentation 'mixupp'"):
        augment.get("flip+mixupp")
    assert augment.mixers("flip-crop+randaugment+erasing+mixup+cutmix") == ["mixup", "cutmix"]
    for name in ("flip-crop+randaugment+erasing+mixup+cutmix", "flip+color-jitter+cutmix"):
        run = tmp_path / name.replace("+", "_")
        assert cli.main(["train", "--data", str(cifar_python_dir), "--preset", "quick", "--augment", name,
                         "--epochs", "1", "--batch-size", "30", "--out", str(run)]) == 0
        assert (run / "report.html").exists()  # its augmented samples drawn through the same pipeline
