"""The fast engine: batch augmentations, precision choice, optimizer scaling, Muon, schedules, lookahead,
whitening, test-time augmentation, and the quick recipe on real data."""

from __future__ import annotations

import json

import pytest
import torch

from cnnlab import device, models, presets, training
from cnnlab.config import DataConfig, TrainConfig, override
from cnnlab.data import augment
from cnnlab.data.dataset import Normalization
from cnnlab.errors import Interrupted
from cnnlab.evaluation import evaluate
from cnnlab.training import optim
from cnnlab.training.loop import Hook
from conftest import CtrlCAt


def _grid(b=2, c=3, h=6, w=6):
    return torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)


def test_translate_moves_whole_images_by_at_most_pad_pixels():
    x = _grid(b=200, c=1, h=8, w=8)
    out = augment.translate(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    offsets = set()
    for i in range(len(x)):
        # every output is one 8x8 window of the reflected image, at an offset within [0, 4]
        match = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(match) == 1
        offsets.add(match[0])
    assert len(offsets) == 25  # all shifts occur


def test_translate_is_seeded():
    x = torch.rand(8, 3, 32, 32)
    a = augment.translate(x, torch.Generator().manual_seed(3), 2)
    assert torch.equal(a, augment.translate(x, torch.Generator().manual_seed(3), 2))
    assert not torch.equal(a, augment.translate(x, torch.Generator().manual_seed(4), 2))


def test_alternating_flip_flips_each_image_every_other_epoch():
    x = torch.rand(1000, 3, 4, 4)
    idx = torch.arange(1000)
    even = augment.alternating_flip(x, idx, epoch=0)
    odd = augment.alternating_flip(x, idx, epoch=1)
    flipped_even = (even == x.flip(3)).flatten(1).all(1)
    flipped_odd = (odd == x.flip(3)).flatten(1).all(1)
    assert torch.equal(flipped_even, ~flipped_odd)  # exactly the other half next epoch
    assert 400 < flipped_even.sum() < 600
    assert torch.equal(augment.alternating_flip(x, idx, epoch=2), even)
    assert torch.equal(even[~flipped_even], x[~flipped_even])


def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(50, 3, 32, 32)
    out = augment.cutout(x, torch.Generator().manual_seed(0), size=12)
    zeros = (out == 0).all(1)  # all channels zeroed together
    per_image = zeros.flatten(1).sum(1)
    assert (per_image <= 13 * 13).all() and (per_image > 0).all()
    assert ((out == 0) | (out == 1)).all()
    ys, xs = zeros[0].nonzero(as_tuple=True)
    assert zeros[0, ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # one solid rectangle


@pytest.mark.parametrize("name", sorted([*augment.AUGMENTS, *augment.PIXEL_OPS]))
def test_every_named_augmentation_keeps_shape_and_range(name):
    x = torch.rand(16, 3, 32, 32)
    out = augment.get(name)(x, torch.Generator().manual_seed(0), epoch=1, idx=torch.arange(16))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1


def test_precision_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert device.pick_precision("fp32", cpu) == torch.float32
    assert device.pick_precision("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.pick_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.pick_precision("auto", cpu) == torch.float32
    with pytest.raises(Exception, match="unknown precision"):
        device.pick_precision("fp8", cpu)
    assert device.precision_name(torch.bfloat16) == "bf16"


def test_cpu_bf16_detection_reads_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512bw\n")
    assert not device.cpu_has_native_bf16(info)
    info.write_text("processor : 0\nflags : fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert device.cpu_has_native_bf16(info)
    info.write_text("flags : fpu amx_bf16 amx_tile\n")
    assert device.cpu_has_native_bf16(info)
    assert not device.cpu_has_native_bf16(tmp_path / "missing")


def test_auto_device_is_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="no CUDA GPU"):
            device.pick_device("cuda")


def test_a_gpu_is_always_named_with_its_index(monkeypatch):
    """`auto` and `cuda` mean `cuda:0` (PyTorch 2.11's torch.cuda.get_per_process_memory_fraction refuses a
    device without an index: every training command failed on the H200 before this); `cuda:1` stays."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [device.pick_device(name) for name in ("auto", "cuda", "cuda:1", "cpu")] == [
        torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")]


def test_per_1024_scaling_keeps_the_step_per_example():
    model = models.build("airbench-s")
    a = optim.make_optimizer(override(presets.FAST, batch_size=1024), model)
    b = optim.make_optimizer(override(presets.FAST, batch_size=256), model)
    # mean loss: the per-example step lr / batch is the same; decoupled decay lr * wd per step scales with batch
    assert a.param_groups[0]["lr"] / 1024 == pytest.approx(b.param_groups[0]["lr"] / 256)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    assert a.param_groups[0]["lr"] == pytest.approx(11.5 / kilostep * 1024)
    assert a.param_groups[0]["lr"] * a.param_groups[0]["weight_decay"] == pytest.approx(0.0153 * 1024 / kilostep)
    # BatchNorm shifts: 64x the learning rate, the same decay per step
    assert a.param_groups[1]["lr"] == pytest.approx(64 * a.param_groups[0]["lr"])
    assert a.param_groups[1]["lr"] * a.param_groups[1]["weight_decay"] == \
        pytest.approx(a.param_groups[0]["lr"] * a.param_groups[0]["weight_decay"])
    assert all(p.requires_grad for g in a.param_groups for p in g["params"])


def test_orthogonalize_sets_every_singular_value_near_one():
    torch.manual_seed(0)
    skewed = torch.randn(64, 576) * torch.logspace(-3, 0, 576)  # condition number about 1000
    for g in (torch.randn(64, 576), torch.randn(576, 64), skewed):
        q = optim.orthogonalize(g)
        s = torch.linalg.svdvals(q)
        assert q.shape == g.shape and s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())
        assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > s.max() / s.min()


def _muon_reference(opt, params: list, grads: list, bufs: list) -> None:
    """FilterMuon's step as it was, one parameter at a time (the reference of the batched one), on copies
    `params` and momentum `bufs` laid out as `opt`'s groups."""
    i = 0
    for group in opt.param_groups:
        n = len(group["params"])
        _muon_group(params[i:i + n], grads[i:i + n], bufs[i:i + n], group)
        i += n


def _muon_group(params: list, grads: list, bufs: list, group: dict) -> None:
    m, lr = group["momentum"], group["lr"]
    for p, g, buf in zip(params, grads, bufs, strict=True):
        g = g.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else g
        buf.mul_(m).add_(g)
        update = g.add(buf, alpha=m) if group["nesterov"] else buf.clone()
        if group["orthogonal"]:
            p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
            update = optim.orthogonalize(update.reshape(len(p), -1)).view_as(p)
        p.add_(update, alpha=-lr)


def test_filter_banks_of_one_shape_step_together_as_each_did_alone_and_gradscaler_hands_them_its_flag():
    """resnet20's filters (several banks of each shape) and the rest, three steps of the batched FilterMuon
    against the per-parameter reference: equal within float tolerance. Under GradScaler (fp16's, on the CPU
    here) the optimizer takes the scaled gradients with `grad_scale` and `found_inf` and is not stepped through
    a host read; an infinite gradient leaves every weight and momentum as it was, and the scale is halved."""
    torch.manual_seed(0)
    model = models.build("resnet20")
    opt = optim.make_optimizer(presets.FAST, model)
    params = [p for g in opt.param_groups for p in g["params"]]
    shapes = [p.shape for p in opt.param_groups[-1]["params"]]
    assert opt.param_groups[-1]["orthogonal"] and len(set(shapes)) < len(shapes)  # banks that share a shape
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        _muon_reference(opt, ref, grads, bufs)
    assert all(torch.allclose(p, r, rtol=1e-4, atol=1e-6) for p, r in zip(params, ref, strict=True))

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # (as a step's loss: the scale is made on first use)
    assert optim.FilterMuon._step_supports_amp_scaling
    before = [p.detach().clone() for p in params]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 1024.0)
    params[0].grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, momentum, strict=True))
    assert scaler.get_scale() == 512.0
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g * 512.0  # as the scaled loss's backward leaves them
    scaler.step(opt)
    _muon_reference(opt, before, grads, momentum)
    assert all(torch.allclose(p, r, rtol=1e-4, atol=1e-6) for p, r in zip(params, before, strict=True))


def test_muon_groups_cover_each_parameter_once_and_filters_take_orthogonal_steps():
    torch.manual_seed(0)
    model = models.build("airbench-s")
    opt = optim.make_optimizer(presets.FAST, model)
    assert isinstance(opt, optim.FilterMuon) and presets.FAST.optimizer == "muon"
    grouped = [p for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    filters = next(g for g in opt.param_groups if g["orthogonal"])
    assert all(p.ndim == 4 for p in filters["params"]) and len(filters["params"]) == 6
    model(torch.randn(8, 3, 32, 32)).square().mean().backward()
    w = model.group2.conv2.weight
    before = w.detach().clone()
    opt.step()
    start = before * len(before) ** 0.5 / before.norm()  # rescaled to a fixed norm, then stepped
    step = (start - w.detach()).reshape(len(w), -1) / filters["lr"]
    s = torch.linalg.svdvals(step)
    assert s.min() > 0.5 and s.max() < 1.5


def test_muon_steps_the_other_parameters_exactly_as_nesterov_sgd():
    torch.manual_seed(0)
    model = models.build("airbench-s")
    twin = models.build("airbench-s")
    twin.load_state_dict(model.state_dict())
    cfg = override(presets.FAST, weight_decay=0.5)  # large enough that the decay term shows
    muon = optim.make_optimizer(cfg, model)
    sgd = optim.make_optimizer(override(cfg, optimizer="sgd"), twin)
    for _ in range(3):  # the same gradients for both, so momentum, Nesterov and decay are all compared
        grads = [torch.randn_like(p) for p in model.parameters()]
        for net, opt in ((model, muon), (twin, sgd)):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g.clone() if p.requires_grad else None
            opt.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        if a.requires_grad and a.ndim != 4:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    assert not torch.allclose(model.group1.conv1.weight, twin.group1.conv1.weight)


def test_triangle_schedule():
    cfg = TrainConfig(optimizer="sgd", lr=1.0, schedule="triangle", warmup=0.25, lr_start=0.2, lr_end=0.1)
    opt = optim.make_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = optim.make_schedule(cfg, opt, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.2) and lrs[25] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(1 + (0.1 - 1) * 74 / 75)


def test_lookahead_averages_and_ends_on_the_average():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    la = optim.Lookahead(model, total_steps=10)
    model.weight.data.fill_(1.0)
    la.step(model, 5)  # decay 0.95^5 * 0.5^3
    d = 0.95 ** 5 * 0.5 ** 3
    assert model.weight.item() == pytest.approx(1 - d)
    model.weight.data.fill_(2.0)
    la.step(model, 7)  # not a multiple of 5: untouched
    assert model.weight.item() == 2.0
    la.step(model, 10)  # the last step: weights become the average, which moves no further (decay 1)
    assert model.weight.item() == pytest.approx(1 - d)


def test_lookahead_with_a_device_side_skip_moves_nothing_when_skipped_and_as_without_it_otherwise():
    """The foreach update under a `skip` flag (a 0-d bool tensor, no host read): a skipped step leaves the weights,
    BatchNorm statistics and the average as they were; a taken one gives the bytes of the update without a flag."""
    torch.manual_seed(0)
    a, b = (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)) for _ in range(2))
    b.load_state_dict(a.state_dict())
    la, lb = optim.Lookahead(a, total_steps=20), optim.Lookahead(b, total_steps=20)
    with torch.no_grad():
        for m in (a, b):
            m[0].weight.add_(1.0)
            m[1].running_mean.add_(0.5)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    lb.step(b, 5, skip=torch.tensor(True))
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())
    la.step(a, 5)
    lb.step(b, 5, skip=torch.tensor(False))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(torch.equal(la.average[k], lb.average[k]) for k in la.average)
    assert not torch.equal(a[0].weight, before["0.weight"])


def test_whitening_layer_decorrelates_patches():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(400, 1, 16, 16, generator=g)
    x = torch.cat([base, 0.5 * base + 0.1 * torch.rand(400, 1, 16, 16, generator=g),
                   torch.rand(400, 1, 16, 16, generator=g)], 1)  # correlated channels
    layer = models.Whiten(3, eps=0.0)
    layer.init_from_data(x)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, layer.weight[:12])  # the positive half of the filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T.double())
    assert torch.allclose(cov, torch.eye(12, dtype=torch.double), atol=0.05)


def test_whitening_can_keep_only_the_largest_patch_directions():
    x = torch.rand(300, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    full, kept = models.Whiten(3, eps=0.0), models.Whiten(3, eps=0.0, keep=4)
    full.init_from_data(x)
    kept.init_from_data(x)
    assert kept.out_channels == 8
    # the 4 largest-variance directions of the 12 (eigh sorts ascending), and their negatives
    assert torch.equal(kept.weight[:4], full.weight[8:12])
    assert torch.equal(kept.weight[4:], -full.weight[8:12])
    net = models.build("airbench-s")
    assert net.whiten.out_channels == 12 and net.group1.conv1.in_channels == 12


def test_normalization_matches_the_textbook_formula():
    x = (torch.rand(5, 3, 4, 4) * 255).to(torch.uint8)
    norm = evaluate.Normalization((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    mean, std = torch.tensor(norm.mean).view(1, 3, 1, 1), torch.tensor(norm.std).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), (x.float() / 255 - mean) / std, atol=1e-5)
    assert torch.allclose(evaluate.Normalization()(x), x.float() / 255, atol=1e-7)


def test_cpu_training_keeps_freed_memory_on_linux():
    import platform
    assert device.keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_tta_views_and_weights():
    x = torch.rand(2, 3, 8, 8)
    for level, count in ((0, 1), (1, 2), (2, 6)):
        views = evaluate.tta_views(x, level)
        assert len(views) == count and sum(w for w, _ in views) == pytest.approx(1.0)
        assert all(v.shape == x.shape for _, v in views)
    assert torch.equal(evaluate.tta_views(x, 1)[1][1], x.flip(3))


def test_tta_of_a_flip_invariant_model_changes_nothing():
    class MeanModel(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))
    x = (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)
    norm = evaluate.Normalization()
    plain = evaluate.predict_logits(MeanModel(), x, norm, torch.device("cpu"))
    mirrored = evaluate.predict_logits(MeanModel(), x, norm, torch.device("cpu"), tta=1)
    assert torch.allclose(plain, mirrored, atol=1e-6)


def test_resume_with_lookahead_and_whitening_equals_uninterrupted(tmp_path, cifar_python_dir):
    cfg = override(presets.QUICK, epochs=2, batch_size=32, whiten_bias_epochs=1)
    data_cfg = DataConfig(path=str(cifar_python_dir))
    whole = training.train(cfg, data_cfg, out=tmp_path / "whole")
    with pytest.raises(Interrupted):
        training.train(cfg, data_cfg, out=tmp_path / "cut", hooks=[CtrlCAt(7)])  # mid-epoch 2 of 5-step epochs
    training.resume(tmp_path / "cut")
    assert (whole / "model.safetensors").read_bytes() == (tmp_path / "cut" / "model.safetensors").read_bytes()


class ReplanAt(Hook):
    """Re-plans the run to `epochs` at the end of its epoch `at`, as a time budget's final run does from its
    own pace (budget/pace.py); records the learning rate of every step."""
    order = 95

    def __init__(self, at: int, epochs: int):
        self.at, self.epochs, self.lrs = at, epochs, []

    def after_step(self, fit) -> None:
        self.lrs.append(fit.state.optimizer.param_groups[0]["lr"])

    def end_epoch(self, fit) -> None:
        if fit.record["epoch"] == self.at:
            fit.replan(self.epochs)


def test_a_run_replanned_between_epochs_ends_its_schedule_there_and_resumes_bit_exactly(tmp_path, cifar_python_dir):
    """`quick` (one-cycle schedule, lookahead) planned for 2 epochs and re-planned to 3 after its first: it trains
    3, config.json and model.json say 3, its last step's learning rate is a 3-epoch run's, and a run interrupted
    after the re-plan resumes (from config.json and its checkpoint) to the same bytes."""
    cfg, data_cfg = override(presets.QUICK, epochs=2, batch_size=32), DataConfig(path=str(cifar_python_dir))
    replanned, planned = ReplanAt(1, 3), ReplanAt(0, 0)
    whole = training.train(cfg, data_cfg, out=tmp_path / "whole", with_report=False, hooks=[replanned])
    training.train(override(cfg, epochs=3), data_cfg, out=tmp_path / "three", with_report=False, hooks=[planned])
    assert len(json.loads((whole / "history.json").read_text())) == 3
    assert json.loads((whole / "config.json").read_text())["train"]["epochs"] == 3
    assert json.loads((whole / "model.json").read_text())["epochs"] == 3
    assert len(replanned.lrs) == len(planned.lrs) and replanned.lrs[-1] == pytest.approx(planned.lrs[-1])
    assert replanned.lrs[:5] != planned.lrs[:5]  # (the first epoch followed the 2-epoch plan)
    with pytest.raises(Interrupted):
        training.train(cfg, data_cfg, out=tmp_path / "cut", with_report=False, hooks=[ReplanAt(1, 3), CtrlCAt(7)])
    training.resume(tmp_path / "cut", with_report=False)
    assert (whole / "model.safetensors").read_bytes() == (tmp_path / "cut" / "model.safetensors").read_bytes()


def test_quick_recipe_one_epoch_on_real_subset(tmp_path, real_subset):
    cfg = override(presets.QUICK, batch_size=64)  # 79 steps on 5,000 images
    run = training.train(cfg, DataConfig(path=str(real_subset)), preset="quick", out=tmp_path / "q")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.45  # chance is 0.1; measured 0.544 (0.426 with SGD throughout)
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"] == "airbench-s" and meta["tta"] == 1  # mirror only: see presets.QUICK
    assert meta["precision"] == device.precision_name(device.pick_precision("auto", torch.device("cpu")))


def test_whitening_bias_trains_for_its_epochs_then_stays(tmp_path, cifar_python_dir):
    cfg = override(presets.FAST, model="airbench-s", epochs=4, batch_size=30)  # 5 steps an epoch
    biases = []

    class Record(Hook):
        order = 0  # at the end of each epoch's steps, before anything else

        def end_epoch(self, fit):
            biases.append(fit.state.model.whiten.bias.detach().clone())
    training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / "r", with_report=False,
                   hooks=[Record()])
    assert cfg.whiten_bias_epochs == 3 and len(biases) == 4
    assert not torch.equal(biases[1], biases[2])  # epoch 3 still trains it
    assert torch.equal(biases[2], biases[3])  # epoch 4 does not


def test_running_out_of_memory_is_one_line_naming_the_batch_sizes(tmp_path, cifar_python_dir):
    """A GPU's out-of-memory error in a step (raised here by a hook, the loop's public seam) ends the run with
    the batch sizes to lower, not an internal error, and leaves no run directory."""
    from cnnlab.errors import CnnlabError
    from cnnlab.training.loop import Hook

    class Full(Hook):
        def after_step(self, fit) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = override(presets.QUICK, epochs=1, batch_size=30, eval_batch_size=120)
    with pytest.raises(CnnlabError, match=r"the GPU ran out of memory with batches of 30 images \(training\) and "
                                          r"120 \(evaluation\): lower --batch-size or --eval-batch-size"):
        training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / "run", with_report=False,
                       hooks=[Full()])
    assert not (tmp_path / "run").exists()

    class Greedy(torch.nn.Module):  # an evaluation alone (cnnlab evaluate, a run's end): its batch is named
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    with pytest.raises(CnnlabError, match=r"ran out of memory with evaluation batches of 250 images: lower "
                                          r"--eval-batch-size"):
        evaluate.predict_logits(Greedy(), torch.zeros(300, 3, 8, 8, dtype=torch.uint8), Normalization(),
                                torch.device("cpu"), batch_size=250)
