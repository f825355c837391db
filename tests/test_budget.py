"""`cnnlab train --budget`: candidates from the data, a search on a held-out split that an interruption does not
lose, a final run inside the budget, the leaderboard in trials.csv and the report."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import budget, cli, dist, models, presets, training
from cnnlab.budget import candidates
from cnnlab.budget.pace import Clock, Deadline
from cnnlab.config import DataConfig, override
from cnnlab.errors import CnnlabError
from cnnlab.models import pretrained
from cnnlab.training.loop import Hook
from conftest import write_image_folder
from test_datasets import write_idx

CNNLAB = [sys.executable, "-m", "cnnlab"]


def trials(run: Path) -> list[dict]:
    path = run / "search" / "trials.csv"
    return list(csv.DictReader(path.open())) if path.is_file() else []


def test_budget_parsing():
    assert [budget.parse(t) for t in ("90s", "10m", "1.5h", "45")] == [90, 600, 5400, 45]
    with pytest.raises(CnnlabError, match="not a duration"):
        budget.parse("ten minutes")


class Slow(Hook):
    """Each epoch takes `seconds` longer (a slow machine, seen from the loop's public seam)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def before_epoch(self, fit) -> None:
        time.sleep(self.seconds)


def _paced(tmp_path, name: str, epochs: int, clock: Clock, seconds: float, caplog) -> tuple[list, dict, str]:
    data = DataConfig(path=str(write_image_folder(tmp_path / "data", per_class=8, size=(16, 16))))
    cfg = override(presets.QUICK, epochs=epochs, batch_size=8)
    with caplog.at_level(logging.INFO, logger="cnnlab.budget"):
        run = training.train(cfg, data, out=tmp_path / name, with_report=False,
                             hooks=[Slow(seconds), Deadline(clock, aim=0.0, most=6)])
    history = json.loads((run / "history.json").read_text())
    return history, json.loads((run / "config.json").read_text())["train"], caplog.text


def test_a_final_run_with_time_to_spare_is_lengthened_from_its_own_pace(tmp_path, caplog):
    """Planned for 4 epochs with 10 minutes left: after its second epoch (the first carries one-time costs) it
    is re-planned to the most it may train, and trains them with config.json saying so."""
    history, train, log = _paced(tmp_path, "long", 4, Clock(600), 0.0, caplog)
    assert "re-planned from 4 to 6 epochs" in log
    assert len(history) == train["epochs"] == 6


def test_a_final_run_on_a_slow_machine_is_shortened_so_its_schedule_ends(tmp_path, caplog):
    """Planned for 6 epochs of at least 2 s with 12 s left: it is re-planned to the epochs that fit after its
    first, and its schedule ends there instead of being cut short at a high learning rate. (With 1-s epochs
    and 6 s, beside two busy processes an epoch's own work took 2.5 s: no second epoch fitted at all.)"""
    history, train, log = _paced(tmp_path, "short", 6, Clock(12), 2.0, caplog)
    assert re.search(r"re-planned from 6 to [1-5] epochs", log), log
    assert len(history) == train["epochs"] < 6 and "ending after" not in log


def test_a_plan_is_lengthened_only_with_a_margin_early_on_and_shortened_to_what_fits():
    """Deadline.replanned on a 30-epoch plan, 5 epochs done at 1 s each: 26.5 s left fit 31 epochs at the pace
    but 29 at 1.1x it, and the plan stays 30 (the margin decides a lengthening, it never shortens); 40 s give
    41 (36 more at 1.1 s); 20 s shorten it to 25; in the last quarter it is never lengthened; the frozen
    epochs of a fine-tune and one more are the least, `most` the most."""
    clock = Clock(1000)

    def replanned(planned: int, done: int, left: float, most: int = 100) -> int:
        deadline = Deadline(clock, aim=10.0, least=7, most=most)
        deadline.walls = [3.0] + [1.0] * (done - 1)
        return deadline.replanned(planned, done, 1.0, now=clock.deadline() - 10.0 - left)

    assert replanned(30, 5, 26.5) == 30 and replanned(30, 5, 40.0) == 41 and replanned(30, 5, 40.0, most=35) == 35
    assert replanned(30, 5, 20.0) == 25 and replanned(30, 23, 40.0) == 30 and replanned(30, 5, 0.5) == 7


def test_a_budget_on_data_that_is_not_there_leaves_nothing(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "missing"), "--budget", "1m", "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_the_candidates_follow_the_images_and_the_weights_on_this_machine(tmp_path, monkeypatch):
    found, _ = candidates.for_data((32, 32))
    assert [c.name for c in found] == ["quick", "fast"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    found, said = candidates.for_data((100, 120))
    assert [c.name for c in found] == ["photos@64", "photos@96"] and "none" in said[0]
    assert [c.name for c in candidates.for_data((96, 96), source_side=150)[0]] == ["photos@64", "photos@96",
                                                                                 "photos@128"]
    cached = pretrained.cached_path(pretrained.IMAGENET["resnet18_imagenet"])
    cached.parent.mkdir(parents=True)
    torch.save(models.build("resnet18_imagenet", 3, 1000, (224, 224)).state_dict(), cached)
    found, said = candidates.for_data((300, 300))
    assert [c.name for c in found] == ["photos@64", "photos@96", "photos@128", "finetune:resnet18_imagenet@128",
                                       "probe:resnet18_imagenet@128"]
    assert found[-1].cfg.head_only and found[-2].cfg.pretrained == "imagenet" and "resnet18_imagenet" in said[0]
    tuned = found[0].tuned(2.0, 0.5, 2)
    assert tuned.lr == 2 * found[0].cfg.lr and tuned.weight_decay == found[0].cfg.weight_decay / 2
    assert tuned.augment == "flip-crop+erasing" and found[0].tuned(1, 1, 0).augment == "flip"
    monkeypatch.setenv("CNNLAB_WEIGHTS_MIRROR", "http://127.0.0.1:9/models")  # nothing listens on port 9
    found, said = candidates.for_data((300, 300), download=True)
    assert len(found) == 5 and "mobilenet_v3_large's ImageNet weights cannot be downloaded" in said[1]
    names = ("photos@64", "finetune:convnext_tiny@128")  # another process's choice: its backbone, cached or not
    assert [c.name for c in candidates.for_data((300, 300), require=names)[0]][-2:] == [
        "finetune:convnext_tiny@128", "probe:convnext_tiny@128"]


def test_photos_larger_than_their_own_size_are_candidates_only_where_the_images_have_detail_there(tmp_path):
    """Photos enlarged tenfold from 12-px ones (as the benchmark's are from CIFAR's) lose little through 96 px,
    and photos@128 is left out, with a line for the log; images with detail at 128 px keep it; images too small
    for 128 px are not measured. The training files come from the cache (Dataset.image_files) for class
    folders, a CSV list and split folders with their own validation folder alike."""
    from cnnlab.data import dataset, images

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    enlarged = np.asarray(Image.fromarray(small).resize((128, 128), Image.BICUBIC))
    noise = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert images.detail_lost(enlarged, 96) < candidates.DETAIL_MIN < images.detail_lost(noise, 96)
    assert images.detail_lost(noise, 128) < 1e-6  # (no round trip at its own size)

    def photo(kind: str, path: Path) -> str:
        base = rng.integers(0, 256, (12, 12, 3) if kind == "enlarged" else (240, 200, 3), dtype=np.uint8)
        Image.fromarray(base).resize((200, 240), Image.BICUBIC).save(path)
        return path.name

    lost = {}
    for kind in ("enlarged", "detailed"):  # class folders; then a CSV list; then train/, val/ and test/
        rows = ["path,label"]
        for c in ("a", "b"):
            (tmp_path / kind / c).mkdir(parents=True)
            rows += [f"{kind}/{c}/{photo(kind, tmp_path / kind / c / f'{i}.png')},{c}" for i in range(20)]
            for split in ("train", "val", "test"):
                (tmp_path / f"{kind}-split" / split / c).mkdir(parents=True)
                for i in range(8 if split == "train" else 3):
                    photo(kind, tmp_path / f"{kind}-split" / split / c / f"{i}.png")
        (tmp_path / f"{kind}.csv").write_text("\n".join(rows) + "\n")
        for where in (tmp_path / kind, tmp_path / f"{kind}.csv", tmp_path / f"{kind}-split"):
            ds = dataset.load_dataset(where, image_size=(96, 96))
            train = ds.image_files("train")
            assert len(train) == len(ds.y_train) and all(f.is_file() for f in train)
            assert not any("val" in f.parts or "test" in f.parts for f in train)
            lost[kind, where.name] = candidates.detail(train, ds.source_side)
    for where in ("", ".csv", "-split"):
        assert lost["enlarged", f"enlarged{where}"] < candidates.DETAIL_MIN < lost["detailed", f"detailed{where}"]
    assert candidates.detail(train, 100) is None  # 128 px is no candidate at a side of 100
    assert dataset.load_dataset(tmp_path / "enlarged").image_files("train")[0].suffix == ".png"
    found, said = candidates.for_data((96, 96), source_side=200, detail=lost["enlarged", "enlarged"])
    assert [c.name for c in found] == ["photos@64", "photos@96"] and "photos above 96 px left out" in said[0]
    found, said = candidates.for_data((96, 96), source_side=200, detail=lost["detailed", "detailed"])
    assert [c.name for c in found] == ["photos@64", "photos@96", "photos@128"] and "left out" not in said[0]


def test_a_budget_downloads_the_presets_backbone_outside_its_clock_or_leaves_it_out(tmp_path, monkeypatch,
                                                                                     capsys):
    """The `finetune` preset's backbone, downloadable from a mirror (a folder, as $CNNLAB_WEIGHTS_MIRROR allows),
    is fetched before the search and tried fine-tuned and as a probe; a download that arrives damaged leaves
    that backbone out, in one log line, and the search goes on without it."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    torch.save(models.build("mobilenet_v3_large", 3, 1000, (224, 224)).state_dict(), mirror / "w.pth")
    digest = hashlib.sha256((mirror / "w.pth").read_bytes()).hexdigest()
    weights = replace(pretrained.IMAGENET["mobilenet_v3_large"], file=f"mobilenet_v3_large-{digest[:8]}.pth")
    (mirror / "w.pth").rename(mirror / weights.file)
    monkeypatch.setitem(pretrained.IMAGENET, "mobilenet_v3_large", weights)  # a mirror of weights made here
    monkeypatch.setenv("CNNLAB_WEIGHTS_MIRROR", mirror.as_uri())
    photos = write_image_folder(tmp_path / "photos", classes=("a", "b", "c"), per_class=8, size=(100, 120),
                                ext=".jpg")
    for name, damaged in (("fetched", False), ("damaged", True)):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / name / "torch"))
        if damaged:
            (mirror / weights.file).write_bytes(b"not the weights" * 100)
        run = tmp_path / name / "run"
        assert cli.main(["train", "--data", str(photos), "--budget", "1m", "--dry-run", "--out", str(run)]) == 0
        said = capsys.readouterr().out
        tried = {t["candidate"] for t in trials(run)}
        sizes = {c for c in tried if c.startswith("photos@")}  # a dry run tries every candidate: both sizes
        assert "mobilenet_v3_large's ImageNet weights can be downloaded" in said  # no larger than the images
        assert sizes == {"photos@64", "photos@96"}
        if damaged:
            assert "leaving out mobilenet_v3_large: " in said and "arrived damaged" in said
            assert tried == sizes
        else:
            assert tried - sizes == {"finetune:mobilenet_v3_large@128", "probe:mobilenet_v3_large@128"}
            assert pretrained.cached_path(weights).is_file()


def test_a_search_interrupted_while_drawing_a_trial_resumes_with_that_candidate(tmp_path):
    """Ctrl-C between Optuna's ask and the last setting drawn leaves a running trial with some settings: the
    resumed search ends it as failed, writes its leaderboard, and tries that candidate's recipe again."""
    from cnnlab.budget.pace import Clock
    from cnnlab.budget.search import COLUMNS, RECIPE, Search

    found, _ = candidates.for_data((32, 32))
    search = Search(tmp_path, found, {}, Clock(60), 0, dist.init())
    cut = search.study.ask()
    assert cut.suggest_categorical("candidate", [c.name for c in found]) == "quick"  # then the Ctrl-C
    resumed = Search(tmp_path, found, {}, Clock(60, spent=10), 0, dist.init())
    assert [t.state.name for t in resumed.study.trials] == ["FAIL", "WAITING", "WAITING"]
    assert resumed.write_csv().read_text().splitlines() == [",".join(COLUMNS)]  # no row for the cut trial
    again = resumed.study.ask()
    assert {k: again.suggest_float(k, 0.3, 3.0) for k in ("lr_factor", "weight_decay_factor")} == {
        k: RECIPE[k] for k in ("lr_factor", "weight_decay_factor")}
    assert again.suggest_categorical("candidate", ["quick", "fast"]) == "fast"


def test_tuned_trials_start_only_before_their_own_deadline_after_every_recipe_trial(tmp_path):
    """The search on 28-px IDX images: with the tuning time already past, each candidate's recipe trial still
    runs and nothing else starts; with time to tune, the next trial is a tuned one."""
    import time as clock_time

    from cnnlab.budget.pace import Clock
    from cnnlab.budget.search import Search
    from cnnlab.config import DataConfig
    from cnnlab.training import load_data

    idx = write_idx(tmp_path / "mnist", n_train=240, n_test=40)[0]
    ds = budget.as_trial_data(budget.held_out(load_data(DataConfig(path=str(idx)).validate(), 0), 0), 0)
    found, _ = candidates.for_data(ds.image_size)
    (tmp_path / "search").mkdir()
    search = Search(tmp_path / "search", found, {c.name: ds for c in found}, Clock(600), 0, dist.init(), max_epochs=2,
                    epochs={"quick": 2, "fast": 1})  # as budget.trial_epochs gives for `fast` twice as slow
    later = clock_time.monotonic() + 600
    search.run(until=later, tune_until=clock_time.monotonic())
    assert [(r["candidate"], r["lr"], r["epochs"]) for r in sorted(trials_of(search), key=lambda r: r["trial"])] == [
        (c.name, f"{c.cfg.lr:.4g}", {"quick": "2", "fast": "1"}[c.name]) for c in found]  # the recipes' settings
    fast = next(t for t in search.study.trials if t.params["candidate"] == "fast")
    assert list(fast.intermediate_values) == [2]  # its one epoch reported at the time of two of `quick`'s
    search.run(until=later, trials=3, tune_until=later)
    assert len(trials_of(search)) == len(found) + 3
    # tuned augmentation: the recipe's own or stronger, never weaker (a final run is longer than any trial)
    tuned = [t for t in search.study.trials if t.number >= len(found)]
    assert all(t.distributions["augment_strength"].low == 1 for t in tuned)
    recipe = {c.name: c.cfg.augment for c in found}
    assert all(r["augment"] in (recipe[r["candidate"]], f"{recipe[r['candidate']]}+erasing")
               for r in trials_of(search) if int(r["trial"]) >= len(found))


def test_a_tuned_trial_is_chosen_over_its_recipe_only_when_it_wins_by_more_than_the_noise(tmp_path):
    """On 750 held-out images one standard error of a difference is ~2.5 points: a tuned `quick` 2 points above
    its recipe's trial is chance, and the recipe's settings are chosen (and compared with `fast`'s recipe); one 6
    points above is chosen; on 7,500 held-out images, 2 points are more than the noise."""
    import optuna

    from cnnlab.budget.pace import Clock
    from cnnlab.budget.search import RECIPE, Search

    found, _ = candidates.for_data((32, 32))

    def search_with(*trials: tuple[str, dict, float, int]) -> Search:
        folder = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        search = Search(folder, found, {}, Clock(60), 0, dist.init())
        for name, params, value, held in trials:
            params = {"candidate": name, **RECIPE, **params}
            search.study.add_trial(optuna.trial.create_trial(
                params=params, value=value, user_attrs={"held_out_images": held},
                distributions={"candidate": optuna.distributions.CategoricalDistribution(["quick", "fast"]),
                               "lr_factor": optuna.distributions.FloatDistribution(0.3, 3.0, log=True),
                               "weight_decay_factor": optuna.distributions.FloatDistribution(0.3, 3.0, log=True),
                               "augment_strength": optuna.distributions.IntDistribution(1, 2)}))
        return search

    tuned = {"lr_factor": 2.0, "augment_strength": 2}
    best = search_with(("quick", {}, 0.60, 750), ("quick", tuned, 0.62, 750)).best()
    assert (best.candidate.name, best.params) == ("quick", RECIPE)
    best = search_with(("quick", {}, 0.60, 750), ("quick", tuned, 0.62, 750), ("fast", {}, 0.61, 750)).best()
    assert (best.candidate.name, best.params) == ("fast", RECIPE)
    best = search_with(("quick", {}, 0.60, 750), ("quick", tuned, 0.66, 750), ("fast", {}, 0.61, 750)).best()
    assert (best.candidate.name, best.params) == ("quick", {**RECIPE, **tuned})
    best = search_with(("quick", {}, 0.60, 7500), ("quick", tuned, 0.62, 7500)).best()
    assert best.params == {**RECIPE, **tuned}
    best = search_with(("fast", tuned, 0.70, 750)).best()  # no recipe trial finished (pruned): the best one
    assert (best.candidate.name, best.params) == ("fast", {**RECIPE, **tuned})


def trials_of(search) -> list[dict]:
    return list(csv.DictReader(search.write_csv().open()))


def test_a_budget_dry_run_on_cifar_sized_images_tracked(tmp_path, cifar_python_dir, capsys):
    """The CIFAR-sized recipes, one epoch each, then one epoch of the winner; MLflow and TensorBoard."""
    run = tmp_path / "run"
    tracked = ["--log", "mlflow", "--log", "tensorboard"]
    assert cli.main(["train", "--data", str(cifar_python_dir), "--budget", "5m", "--dry-run", "--no-report",
                     *tracked, "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    rows = trials(run)
    assert sorted(r["candidate"] for r in rows) == ["fast", "quick"] and all(r["epochs"] == "1" for r in rows)
    assert "Epoch 1/1" in printed.split("final run:")[1] and "until 35% of the budget is spent" in printed
    config = json.loads((run / "config.json").read_text())
    assert config["preset"] == "budget" and config["train"]["epochs"] == 1
    if tracked:  # each trial a child of the budget's MLflow run; TensorBoard finds the trials under the run
        import mlflow  # (the tracking extra: `make test` installs it)

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
        parent = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
        assert len(runs) == 3 and len(children) == 2
        assert "test_accuracy" in next(r for r in runs if r.info.run_id == parent).data.metrics
        assert (run / "tensorboard").is_dir() and len(list(run.glob("search/trial-*/tensorboard"))) == 2
    for flags in (["--preset", "fast"], ["--epochs", "3"], ["--batch-size", "64"], ["--lr", "0.1"]):
        assert cli.main(["train", "--data", str(cifar_python_dir), "--budget", "1m", *flags]) == 2
        assert "--budget chooses the recipe" in capsys.readouterr().err


def test_trials_take_equal_time_and_a_network_from_scratch_is_the_largest_that_sees_enough_images():
    """Timed epochs of 6, 9 and 24 s at 64, 96 and 128 px: trials of 3, 2 and 1 epochs (the same seconds). On
    5,000 images a network from scratch needs 20 epochs (SCRATCH_IMAGES): with 130 s for the final run 64 px is
    the size from scratch where a fine-tune of a pretrained backbone needs one epoch; with 200 s 96 px and no
    smaller one; with 50 s the quickest size stays; with 5 s no network from scratch. On CIFAR-10's 50,000
    images `fast` (2 epochs) replaces `quick` where it fits."""
    photos = candidates.for_data((96, 96), source_side=150)[0]
    tuned = replace(presets.get("finetune"), model="resnet18_imagenet")
    found = [*photos, candidates.Candidate("finetune:resnet18_imagenet@128", tuned, (128, 128)),
             candidates.Candidate("probe:resnet18_imagenet@128", replace(tuned, head_only=True), (128, 128))]
    epoch = {"photos@64": 6.0, "photos@96": 9.0, "photos@128": 24.0, "finetune:resnet18_imagenet@128": 100.0}
    assert budget.trial_epochs(found, epoch, 3) == {"photos@64": 3, "photos@96": 2, "photos@128": 1,
                                                    "finetune:resnet18_imagenet@128": 1,
                                                    "probe:resnet18_imagenet@128": 3}  # (a probe is not timed)
    pretrained = ["finetune:resnet18_imagenet@128", "probe:resnet18_imagenet@128"]
    assert budget.SCRATCH_IMAGES == 20 * 5_000
    assert budget.reachable(found, epoch, room=130, images=5_000) == ["photos@64", *pretrained]
    assert budget.reachable(found, epoch, room=200, images=5_000) == ["photos@96", *pretrained]
    assert budget.reachable(found, epoch, room=480, images=5_000) == ["photos@128", *pretrained]
    assert budget.reachable(found, epoch, room=480, images=4_000) == ["photos@96", *pretrained]  # 25 epochs
    assert budget.reachable(found, epoch, room=50, images=5_000) == ["photos@64", "probe:resnet18_imagenet@128"]
    assert budget.reachable(found, epoch, room=5, images=5_000) == ["probe:resnet18_imagenet@128"]
    assert budget.reachable(photos, epoch, room=5, images=5_000) == ["photos@64"]  # the quickest of all
    cifar = candidates.for_data((32, 32))[0]  # quick and fast: one network from scratch at two widths
    assert budget.reachable(cifar, {"quick": 20.0, "fast": 190.0}, room=585, images=50_000) == ["fast"]
    assert budget.reachable(cifar, {"quick": 20.0, "fast": 190.0}, room=300, images=50_000) == ["quick"]


def test_a_trial_gives_a_large_batch_enough_steps():
    """A trial's sample: a fifth of the training images, at least 2,000 and at least 20 batches of the
    candidate's, at most all: on CIFAR-10's 42,500 held-in images `fast` (batch 1,024) trains on 20,480 where
    `quick` (batch 256) on the usual 8,500; on 5,000 images `fast` gets them all."""
    quick, fast = (presets.get(name).batch_size for name in ("quick", "fast"))
    usual = budget.trial_size(1, 42_500)
    assert usual == round(budget.TRIAL_SHARE * 42_500) == budget.trial_size(quick, 42_500)
    assert budget.trial_size(fast, 42_500) == budget.TRIAL_STEPS * fast > usual
    assert budget.trial_size(fast, 5_000) == 5_000 and budget.trial_size(1, 5_000) == budget.TRIAL_MIN


def test_a_candidate_whose_epoch_cannot_fit_the_final_run_is_left_out_before_any_trial(tmp_path, capsys):
    """10 seconds on 10,000 CIFAR-sized images: each candidate's step is timed first, and a candidate one epoch of
    which on all the training images would outlast the final run's share is never tried; the quickest stays.
    (Here `fast`'s epoch of 8,500 images came to ~25 s against 6.5 s.)"""
    from conftest import fake_cifar_arrays, write_cifar_python

    data = write_cifar_python(tmp_path / "cifar-10-batches-py", fake_cifar_arrays(per_batch=2000))
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--budget", "10s", "--no-report", "--out", str(run)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "from a step timed now" in ln)
    epoch = {name: float(s) for name, s in re.findall(r"(\w+) ~([\d.]+) s", line)}
    room = float(re.search(r"the final run has ([\d.]+) s", line).group(1))
    assert set(epoch) == {"quick", "fast"} and room == pytest.approx(6.5)
    kept = {min(epoch, key=epoch.get)}  # neither sees 100,000 images (10 epochs) in 6.5 s: the quickest
    assert {r["candidate"] for r in trials(run)} == kept and kept < set(epoch), line  # (the quickest stays)
    assert f"leaving out {', '.join(sorted(set(epoch) - kept))}" in line


def test_a_budget_on_photos_is_searched_resumed_after_ctrl_c_and_kept(tmp_path):
    """30 s on a generated photo folder: Ctrl-C after the first trial, --resume finishes the search with the time
    left and trains the winner; the whole stays within the budget + 10% by its own account, the trials never
    saw the test images, and the leaderboard is in trials.csv and the report."""
    photos = write_image_folder(tmp_path / "photos", classes=("a", "b", "c", "d"), per_class=30, size=(100, 120),
                                ext=".jpg")
    run, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1", "CNNLAB_WEIGHTS_MIRROR": "http://127.0.0.1:9/"}
    log = (tmp_path / "first.log").open("w")
    job = subprocess.Popen([*CNNLAB, "train", "--data", str(photos), "--budget", "30s", "--out", str(run)],
                           stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120  # Ctrl-C once the first trial has started (one size: a single candidate)
    while not (run / "search" / "trial-000").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    assert job.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()
    first = (tmp_path / "first.log").read_text()
    assert f"cnnlab train --resume {run}" in first and not (run / "model.safetensors").exists()
    done_before = trials(run)
    proc = subprocess.run([*CNNLAB, "train", "--resume", str(run)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    rows = trials(run)
    # one network from scratch: at the largest input size at which the final run sees SCRATCH_IMAGES images
    # (the slowest that fits, else the quickest: from the search's own record of each epoch's seconds, since
    # the log rounds them to 0.1 s and two sizes on a busy machine can time alike, the larger even quicker)
    line = next(ln for ln in first.splitlines() if "from a step timed now" in ln)
    timed = json.loads((run / "search" / "budget.json").read_text())["epoch"]
    room = float(re.search(r"the final run has ([\d.]+) s", line).group(1))
    images = int(re.search(r"an epoch of the ([\d,]+) training", line).group(1).replace(",", ""))
    epochs = math.ceil(budget.SCRATCH_IMAGES / images)
    fitting = [name for name, s in timed.items() if s * epochs <= room + 0.05]  # (room: rounded to 0.1 s)
    name = max(fitting, key=timed.get) if fitting else min(timed, key=timed.get)
    size = int(name.split("@")[1])
    said = first + "\n--- resumed ---\n" + proc.stdout  # (in a failure's message)
    # the resumed search keeps the candidates chosen at the start, not timed again (on a busier machine a
    # second timing may choose another size, which the study's trials do not name)
    kept = json.loads((run / "search" / "budget.json").read_text())["candidates"]
    assert "from a step timed now" not in proc.stdout and kept == [f"photos@{size}"], said
    assert len(timed) == 2 and {r["candidate"] for r in rows} == {f"photos@{size}"}, said
    assert len(rows) > len(done_before) or "trial " in proc.stdout.split("resuming the search")[1], said
    spent = float(re.search(r"budget: done; (\d+) s spent", proc.stdout).group(1))
    assert spent <= 33, said
    best = list(csv.DictReader((run / "trials.csv").open()))[0]["candidate"]
    assert best in proc.stdout.split("final run: ")[1], said
    final = json.loads((run / "config.json").read_text())["data"]
    trial = json.loads(next((run / "search").glob("trial-*/config.json")).read_text())["data"]
    # a trial's "test" is the held-out split (its training sample is every other training image here: under
    # 2,000); the final run is given the held-out images back and validates on the test set as a plain run does
    assert final["train_images"] == trial["train_images"] + trial["test_images"] and final["val_images"] is None
    assert final["test_images"] != trial["test_images"] and "the test set" in final["validation"]
    assert "The budget&#x27;s search" in (run / "report.html").read_text() or \
        "The budget's search" in (run / "report.html").read_text()


def test_a_budget_in_two_processes_on_idx_files_runs_each_trial_on_both(tmp_path):
    """--nproc 2 on MNIST-style IDX files (grey, 28 px), 20 seconds: process 0 keeps the study; every trial and
    the final run train on both processes, which re-plan the final run's epochs alike, inside the budget."""
    run, idx = tmp_path / "run", write_idx(tmp_path / "mnist", n_train=200, n_test=50)[0]
    proc = subprocess.run([*CNNLAB, "train", "--nproc", "2", "--data", str(idx), "--budget", "20s",
                           "--no-report", "--out", str(run)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = trials(run)
    line = next(ln for ln in proc.stdout.splitlines() if "from a step timed now" in ln)
    epoch = {name: float(s) for name, s in re.findall(r"(\w+) ~([\d.]+) s", line)}
    # neither width sees 100,000 images (500 epochs of 200) in 13 s: the quickest alone, tuned for SOLO_SHARE
    assert set(epoch) == {"quick", "fast"} and {r["candidate"] for r in rows} == {min(epoch, key=epoch.get)}
    assert int(re.search(r"tuned ones until (\d+)%", proc.stdout).group(1)) <= 100 * budget.SOLO_SHARE
    assert proc.stdout.count("2 processes of") == len(rows) + 1  # every trial and the final run
    assert json.loads((run / "config.json").read_text())["environment"]["processes"] == 2
    epochs = json.loads((run / "config.json").read_text())["train"]["epochs"]  # as re-planned, if it was
    trained = len(json.loads((run / "history.json").read_text()))
    assert trained == epochs or f"ending after epoch {trained} of {epochs}" in proc.stdout, proc.stdout[-3000:]
    assert float(re.search(r"budget: done; (\d+) s spent", proc.stdout).group(1)) <= 22
