"""Transfer learning: torchvision-compatible backbones, --pretrained, fine-tuning with a frozen phase, linear
probes on cached embeddings, and every backbone through export, predict and serve.

The ImageNet files cannot be downloaded here, so "imagenet" is served from the hub cache with random weights
of the right shapes (what torchvision's file would give, but for the values), and the download is tested
against an unreachable address and a file mirror holding a damaged file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cnnlab import cli, logs, models, presets, training
from cnnlab.config import DataConfig, TrainConfig, override
from cnnlab.errors import CnnlabError, Interrupted
from cnnlab.models import backbones, pretrained
from cnnlab.run import Run
from cnnlab.training import finetune, preflight, probe
from cnnlab.training.loop import Hook
from cnnlab.training.optim import make_optimizer, make_schedule
from conftest import CtrlCAt, write_image_folder

MANIFEST = json.loads((Path(__file__).parent / "torchvision_manifest.json").read_text())["backbones"]
QUIET = dict(with_report=False)


# ---------------------------------------------------------------------------------------------------
# The networks


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_state_dict_keys_and_shapes_are_torchvisions(name):
    """The manifest is what benchmarks/torchvision_parity.py recorded from torchvision itself (make parity)."""
    with torch.device("meta"):
        net = models.build(name, 3, 1000, (224, 224))
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == MANIFEST[name]


def test_every_backbone_is_pinned_and_has_imagenet_weights():
    with torch.device("meta"):
        registered = {n for n in models.MODELS if isinstance(models.build(n), backbones.Backbone)}
    assert registered == set(MANIFEST) == set(pretrained.IMAGENET)
    assert all(w.url.startswith(pretrained.TORCHVISION_URL) and len(w.hash_prefix) == 8
               for w in pretrained.IMAGENET.values())


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_head_embedding_and_layer_groups(name):
    torch.manual_seed(0)
    net = models.build(name, 3, 7, (64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.head(net.embed(x)))
    groups = finetune.layer_groups(net)
    ids = [id(p) for g in groups for p in g]
    assert sorted(ids) == sorted(id(p) for p in net.parameters()) and len(set(ids)) == len(ids)
    assert {id(p) for p in groups[2]} == {id(p) for p in net.head.parameters()} and groups[0] and groups[1]
    assert net.head.out_features == 7 and finetune.head_name(net) == net.head_name


# ---------------------------------------------------------------------------------------------------
# --pretrained


DEFAULT = presets.get("finetune").model  # mobilenet_v3_large
RESNET = "resnet18_imagenet"  # the tests that look at particular layers use its names (conv1, fc, ...)


@pytest.fixture(scope="session")
def imagenet_files(tmp_path_factory) -> dict[str, Path]:
    """The preset's network's and ResNet-18's weights as torchvision's files hold them (random values, 1000
    classes), under torchvision's file names."""
    folder = tmp_path_factory.mktemp("weights")
    for name in (DEFAULT, RESNET):
        torch.manual_seed(0)
        torch.save(models.build(name, 3, 1000, (224, 224)).state_dict(), folder / pretrained.IMAGENET[name].file)
    return {name: folder / pretrained.IMAGENET[name].file for name in (DEFAULT, RESNET)}


@pytest.fixture
def imagenet_in_cache(imagenet_files, isolated_home, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("TORCH_HOME", str(isolated_home / "torch"))
    for name, path in imagenet_files.items():
        dest = pretrained.cached_path(pretrained.IMAGENET[name])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return imagenet_files


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("photos") / "p", classes=("a", "b", "c"), per_class=12,
                              size=(40, 48))


def test_offline_imagenet_fails_in_one_line_naming_url_and_path(tmp_path, monkeypatch, capsys, photos):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CNNLAB_WEIGHTS_MIRROR", "http://127.0.0.1:9/models")  # nothing listens on port 9
    code = cli.main(["train", "--preset", "finetune", "--data", str(photos), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    file = pretrained.IMAGENET[DEFAULT].file
    path = tmp_path / "torch" / "hub" / "checkpoints" / file
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"http://127.0.0.1:9/models/{file}" in err and f"place it at {path}" in err
    assert not (tmp_path / "run").exists() and not path.exists()


def test_a_damaged_download_is_refused_and_not_kept(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "resnet18-f37072fd.pth").write_bytes(b"not the weights" * 1000)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CNNLAB_WEIGHTS_MIRROR", mirror.as_uri())
    with pytest.raises(CnnlabError, match="arrived damaged"):
        pretrained.fetch("resnet18_imagenet")
    assert not any((tmp_path / "torch").rglob("*.pth"))


def test_weights_files_of_every_form_load(tmp_path):
    torch.manual_seed(1)
    state = models.build("resnet18_imagenet", 3, 5, (32, 32)).state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("plain.pth", "ddp.pt", "w.safetensors"):
        net = models.build("resnet18_imagenet", 3, 5, (32, 32))
        said = pretrained.load_into(net, "resnet18_imagenet", "fc", str(tmp_path / name))
        assert f"{len(state)} of {len(state)} tensors copied" in said
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    grey = models.build("resnet18_imagenet", 1, 3, (32, 32))  # another class count and one channel
    said = pretrained.load_into(grey, "resnet18_imagenet", "fc", str(tmp_path / "plain.pth"))
    assert "new 3-class head" in said and "adapted from 3 to 1 channels" in said
    torch.testing.assert_close(grey.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(grey.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_weights_that_do_not_fit_are_one_clear_error(tmp_path):
    torch.save(models.build("resnet20", 3, 10, (32, 32)).state_dict(), tmp_path / "other.pth")
    net = models.build("resnet18_imagenet", 3, 5, (32, 32))
    with pytest.raises(CnnlabError, match="does not fit this network .*same architecture"):
        pretrained.load_into(net, "resnet18_imagenet", "fc", str(tmp_path / "other.pth"))
    torch.save({"w": torch.zeros(1), "code": ValueError("x")}, tmp_path / "pickled.pth")
    with pytest.raises(CnnlabError, match="cannot read weights"):
        pretrained.load_into(net, "resnet18_imagenet", "fc", str(tmp_path / "pickled.pth"))
    for bad, match in (("imagenet", "'resnet18' has no ImageNet weights .*resnet18_imagenet"),
                       (str(tmp_path / "missing.pth"), "no such file")):
        with pytest.raises(CnnlabError, match=match):
            preflight.check_names(override(presets.get("finetune"), model="resnet18", pretrained=bad))
    with pytest.raises(CnnlabError, match="frozen body needs trained weights"):
        replace(presets.get("finetune"), pretrained=None).validate()


def test_imagenet_weights_bring_their_input_size_and_normalization(imagenet_in_cache, photos, tmp_path):
    assert preflight.input_size(presets.get("finetune"), DataConfig()).image_size == (224, 224)
    assert preflight.input_size(presets.get("finetune"), DataConfig(image_size=(64, 64))).image_size == (64, 64)
    cfg = override(presets.get("finetune"), epochs=2, eval_batch_size=50)
    run = training.train(cfg, DataConfig(path=str(photos), image_size=(32, 32)), out=tmp_path / "r", **QUIET)
    meta = json.loads((run / "model.json").read_text())
    assert meta["normalization"] == {"mean": list(pretrained.IMAGENET_MEAN), "std": list(pretrained.IMAGENET_STD)}
    assert meta["pretrained"] == "imagenet" and meta["image_size"] == [32, 32]


@pytest.mark.parametrize("given", ["model.safetensors", "run directory"])
def test_weights_of_a_cnnlab_run_bring_its_input_size_and_normalization(cifar_python_dir, tmp_path, given):
    """A body trained on 32-px CIFAR images with their own statistics, fine-tuned on 80x60 photos (which would
    become 96 px) with a preset that says `imagenet`: the photos are prepared as the body's images were."""
    from test_photos import write_split

    source = training.train(TrainConfig(model="resnet20", epochs=1, batch_size=50, normalize="meanstd", threads=2),
                         DataConfig(path=str(cifar_python_dir)), out=tmp_path / "cifar", **QUIET)
    source_meta = json.loads((source / "model.json").read_text())
    write_split(tmp_path / "photos" / "train", 4)
    write_split(tmp_path / "photos" / "test", 2)
    weights = source / "model.safetensors" if given == "model.safetensors" else source
    cfg = replace(presets.get("finetune"), model="resnet20", pretrained=str(weights), epochs=2, threads=2)
    with logs.captured() as lines:
        run = training.train(cfg, DataConfig(path=str(tmp_path / "photos")), out=tmp_path / "photos-run",
                             with_report=False)
    meta = json.loads((run / "model.json").read_text())
    assert meta["image_size"] == [32, 32] and meta["normalization"] == source_meta["normalization"]
    assert meta["normalization"]["mean"] != list(pretrained.IMAGENET_MEAN)
    assert f"input size 32x32, as the weights' run {source} was trained (--image-size to change it)" in lines
    other = preflight.input_size(cfg, DataConfig(image_size=(48, 48)))  # --image-size still wins
    assert other.image_size == (48, 48)


# ---------------------------------------------------------------------------------------------------
# Fine-tuning


class Snapshots(Hook):
    """The model's state_dict at the end of each training epoch, before its validation and checkpoint."""
    order = 0

    def __init__(self):
        self.taken: list[dict] = []

    def end_epoch(self, fit) -> None:
        self.taken.append({k: v.clone() for k, v in fit.state.model.state_dict().items()})


def test_discriminative_rates_and_a_cycle_per_phase():
    cfg = presets.get("finetune")
    net = models.build("resnet18_imagenet", 3, 5, (32, 32))
    opt = make_optimizer(cfg, net)
    assert sorted({round(g["lr"], 8) for g in opt.param_groups}) == [2e-5, 2e-4, 2e-3]
    schedule = make_schedule(cfg, opt, total_steps=48, frozen_steps=8)  # warm-ups of 2 and 10 steps
    factors = [schedule.lr_lambdas[0](s) for s in range(48)]
    assert factors[0] == factors[8] == pytest.approx(cfg.lr_start)  # each phase starts its own cycle
    assert factors[2] == factors[18] == pytest.approx(1.0) and factors[7] < 0.1 and factors[47] < 0.01


def test_frozen_epochs_keep_the_body_and_its_statistics(imagenet_in_cache, cifar_python_dir, tmp_path):
    spy = Snapshots()
    cfg = override(presets.get("finetune"), model=RESNET, epochs=3, freeze_epochs=2, batch_size=30, eval_batch_size=100)
    training.train(cfg, DataConfig(path=str(cifar_python_dir), image_size=(32, 32)), out=tmp_path / "ft", hooks=[spy],
                   **QUIET)
    snapshots = spy.taken
    start = torch.load(imagenet_in_cache[RESNET])
    body = [k for k in start if not k.startswith("fc.")]
    for frozen in snapshots[:2]:  # weights, BatchNorm running statistics and their counters
        assert all(torch.equal(frozen[k], start[k]) for k in body)
    assert not torch.equal(snapshots[0]["fc.weight"], snapshots[1]["fc.weight"])  # the head trained
    assert not torch.equal(snapshots[2]["conv1.weight"], start["conv1.weight"])
    assert not torch.equal(snapshots[2]["bn1.running_mean"], start["bn1.running_mean"])


def test_lr_find_starts_from_the_pretrained_weights(imagenet_in_cache, photos, tmp_path):
    from cnnlab import data
    from cnnlab.training import lrfind

    ds = data.load(DataConfig(path=str(photos), image_size=(32, 32)))
    result = lrfind.find_lr(presets.get("finetune"), ds, steps=5)
    assert len(result.lrs) == 5


# ---------------------------------------------------------------------------------------------------
# Linear probes


def test_head_only_caches_embeddings_and_agrees_with_the_whole_network(imagenet_in_cache, photos, tmp_path):
    from cnnlab.evaluation import evaluate

    cfg = override(presets.get("finetune"), model=RESNET, head_only=True, epochs=4, precision="fp32")
    data = DataConfig(path=str(photos), image_size=(32, 32))
    with logs.captured() as said:
        first = training.train(cfg, data, out=tmp_path / "a", with_report=False)
    assert any("left out" in line and "augment" in line for line in said)
    cached = sorted((Path(os.environ["CNNLAB_CACHE"]) / "features").glob("*.safetensors"))
    assert len(cached) == 2  # train and test
    second = training.train(cfg, data, out=tmp_path / "b", with_report=False)
    assert Run(first).weights()["fc.weight"].equal(Run(second).weights()["fc.weight"])
    recorded = json.loads((first / "metrics.json").read_text())["test_accuracy"]
    assert evaluate.evaluate_run(first)["test_accuracy"] == pytest.approx(recorded)
    model, meta = models.load_model(first)
    assert meta["head_only"] and meta["tta"] == 0
    start = torch.load(imagenet_in_cache[RESNET])
    assert torch.equal(model.layer3[0].conv1.weight, start["layer3.0.conv1.weight"])


def test_feature_key_follows_weights_normalization_and_pixels():
    from cnnlab.data.dataset import Normalization

    net = models.build("resnet18_imagenet", 3, 5, (32, 32))
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    key = probe.feature_key(net, Normalization(), torch.float32, x)
    net.fc.weight.data += 1  # the head is not part of it
    assert probe.feature_key(net, Normalization(), torch.float32, x) == key
    net.conv1.weight.data += 1
    changed = [probe.feature_key(net, Normalization(), torch.float32, x),
               probe.feature_key(models.build("resnet18_imagenet", 3, 5, (32, 32)), Normalization((0.5,), (0.5,)),
                                 torch.float32, x),
               probe.feature_key(net, Normalization(), torch.bfloat16, x),
               probe.feature_key(net, Normalization(), torch.float32, x + 1)]
    assert len({key, *changed}) == 5


# ---------------------------------------------------------------------------------------------------
# Two processes; export, predict and serve


def _cli(*args, env_home: Path, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TORCH_HOME": str(env_home / "torch"), "OMP_NUM_THREADS": "1", "CNNLAB_DIST_TIMEOUT": "60"}
    return subprocess.run([sys.executable, "-m", "cnnlab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_fine_tuning_and_probes_in_two_processes(imagenet_in_cache, isolated_home, photos, tmp_path):
    """Freezing rebuilds DistributedDataParallel when the body thaws; a probe embeds half the images per process
    and trains the same head as one process does."""
    common = ["--preset", "finetune", "--model", RESNET, "--data", photos, "--image-size", "32", "--no-report",
              "--batch-size", "12"]
    proc = _cli("train", "--nproc", "2", *common, "--epochs", "3", "--freeze-epochs", "1", "--out", tmp_path / "ft",
                env_home=isolated_home)
    assert proc.returncode == 0, proc.stderr
    assert "Epoch 3/3" in proc.stdout and (tmp_path / "ft" / "metrics.json").is_file()
    probes = ["--head-only", "--precision", "fp32", "--epochs", "3"]
    for n, out in ((2, "p2"), (1, "p1")):
        proc = _cli("train", "--nproc", n, *common, *probes, "--out", tmp_path / out, env_home=isolated_home)
        assert proc.returncode == 0, proc.stderr
    one, two = (models.load_model(tmp_path / p)[0].fc.weight for p in ("p1", "p2"))
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_backbone_from_scratch_evaluates_above_chance_exports_and_predicts(name, photos, tmp_path):
    """Three epochs of 3 steps from random weights: BatchNorm's running averages (momentum 0.01 in MobileNetV3,
    0.1 elsewhere) cannot converge, so a run that evaluated by them predicted one class (1/3) here; their
    statistics are computed before each validation instead (batchnorm.py)."""
    pytest.importorskip("onnxruntime")
    from cnnlab import deploy
    from cnnlab.deploy import export

    cfg = replace(presets.get("finetune"), model=name, pretrained=None, freeze_epochs=0, lr_spread=1.0, epochs=3,
                  tta=0, threads=2)
    run = training.train(cfg, DataConfig(path=str(photos), image_size=(32, 32)), out=tmp_path / name, **QUIET)
    # chance is 1/3 (6 of 18, what one class for every image gave); measured 0.61-1.00 with AVX-512 kernels
    # (bf16) and 0.50 and up with AVX2 ones (fp32)
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] > 0.4
    result = export.export_onnx(run)  # checks onnxruntime against PyTorch on the test images, or fails
    assert result["max_abs_diff"] < export.TOLERANCE
    image = next((photos / "test" / "b").iterdir())
    via_onnx = deploy.predict_files(Path(result["path"]), [str(image)], 3)[0]["predictions"]
    via_run = deploy.predict_files(run, [str(image)], 3)[0]["predictions"]
    assert [p["class"] for p in via_onnx] == [p["class"] for p in via_run]


@pytest.mark.parametrize("head_only", [False, True], ids=["fine-tune", "head-only"])
def test_end_to_end_train_report_export_serve(head_only, imagenet_in_cache, photos, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from cnnlab.deploy import export, serve

    # ResNet-18 rather than the preset's MobileNetV3: the same recipe and path, half the export's tracing time
    # (every backbone, the preset's own included, is exported by the test above)
    cfg = override(presets.get("finetune"), epochs=3, head_only=head_only, model="resnet18_imagenet")
    run = training.train(cfg, DataConfig(path=str(photos), image_size=(32, 32)), out=tmp_path / "run")
    assert (run / "report.html").is_file() and "resnet18_imagenet" in (run / "report.html").read_text()
    onnx = export.export_onnx(run)["path"]
    image = next((photos / "test" / "c").iterdir())
    for model in (run, onnx):
        with TestClient(serve.create_app(serve.ServeConfig(model=str(model), device="cpu"))) as c:
            answer = c.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))])
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["results"][0]["predictions"]) == 3


@pytest.mark.parametrize("stop_at", [3, 13], ids=["frozen", "thawed"])
def test_a_fine_tune_resumes_bit_exactly_on_either_side_of_the_thaw(imagenet_in_cache, cifar_python_dir, tmp_path,
                                                                     stop_at):
    """150 images in batches of 30: 5 steps an epoch; two frozen epochs, then one of everything."""
    cfg = override(presets.get("finetune"), epochs=3, freeze_epochs=2, batch_size=30, eval_batch_size=100,
                   precision="fp32")
    data = DataConfig(path=str(cifar_python_dir), image_size=(32, 32))
    whole = training.train(cfg, data, out=tmp_path / "whole", **QUIET)
    with pytest.raises(Interrupted):
        training.train(cfg, data, out=tmp_path / "cut", hooks=[CtrlCAt(stop_at)], **QUIET)
    training.resume(tmp_path / "cut", with_report=False)
    assert (whole / "model.safetensors").read_bytes() == (tmp_path / "cut" / "model.safetensors").read_bytes()


def test_a_finished_probe_resumes_as_complete(imagenet_in_cache, photos, tmp_path):
    cfg = override(presets.get("finetune"), head_only=True, epochs=2)
    run = training.train(cfg, DataConfig(path=str(photos), image_size=(32, 32)), out=tmp_path / "p", **QUIET)
    with logs.captured() as said:
        training.resume(run, with_report=False)
    assert any("is complete" in line for line in said), said


@pytest.mark.parametrize("preset,model", [("seed", "seed"), ("quick", "airbench-s"), ("standard", "resnet20")])
def test_freezing_and_spread_rates_on_the_other_preset_families(preset, model, cifar_python_dir, tmp_path):
    """Any network takes a weights file, a frozen phase and spread rates: its head is its last linear layer and
    its body splits in halves. The frozen epoch leaves every body tensor (BatchNorm statistics included) as
    the file had it; airbench's fixed whitening stays fixed after the thaw."""
    torch.manual_seed(3)
    weights = tmp_path / "w.safetensors"
    source = models.build(model, 3, 10, (32, 32))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    spy = Snapshots()
    cfg = override(presets.get(preset), pretrained=str(weights), freeze_epochs=1, lr_spread=10.0, epochs=2,
                   batch_size=30, eval_batch_size=100)
    training.train(cfg, DataConfig(path=str(cifar_python_dir)), out=tmp_path / "run", hooks=[spy], **QUIET)
    snapshots = spy.taken
    head = finetune.head_name(source)
    start = source.state_dict()
    body = [k for k in start if not finetune.is_head(k, head) and not k.endswith("whiten.weight")]
    assert all(torch.equal(snapshots[0][k], start[k]) for k in body)
    assert not torch.equal(snapshots[0][f"{head}.weight"], start[f"{head}.weight"])
    assert any(not torch.equal(snapshots[1][k], start[k]) for k in body)
    if model == "airbench-s":  # set from data, never trained: the same in both epochs
        assert torch.equal(snapshots[0]["whiten.weight"], snapshots[1]["whiten.weight"])


def test_a_probe_on_cifar_arrays(imagenet_in_cache, cifar_python_dir, tmp_path):
    cfg = override(presets.get("finetune"), head_only=True, epochs=3)
    run = training.train(cfg, DataConfig(path=str(cifar_python_dir), image_size=(32, 32)), out=tmp_path / "p", **QUIET)
    meta = json.loads((run / "model.json").read_text())
    assert meta["head_only"] and meta["model"] == DEFAULT and (run / "metrics.json").is_file()
