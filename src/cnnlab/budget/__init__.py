"""`cnnlab train --budget 10m`: the best classifier this data allows on this machine in that time, found by
searching on the data itself.

    candidates (candidates.py)    from the images' size and the backbone weights on this machine
    a held-out split              15% of the training images (or the data's own validation split); the
                                  test set is not looked at until the final evaluation
    trial data                    a stratified fifth of the training images (at least 2,000)
    the search (search.py)        trials on the held-out split, with successive halving, until SEARCH_SHARE
                                  of the budget is spent (tuned ones until SOLO_SHARE where one candidate
                                  is in reach); the leaderboard in the log and in trials.csv
    the final run                 the best candidate and settings, for the epochs that the rest of the
                                  budget fits at the pace its trials measured; it sees the data as a plain
                                  `cnnlab train` does: every training image, the held-out ones given back
                                  (validated, calibrated on the data's own validation split, else on the
                                  test set as the tutorial does, keeping the last epoch); after each epoch
                                  it re-plans its length from its own pace (pace.Deadline), and it is
                                  evaluated on the test set

The budget covers everything from the start of the command to the final metrics except decoding data into
the cache for the first time, which the log states. The run directory holds the final run and `search/`
(the Optuna study in SQLite, each trial's run); `cnnlab train --resume RUN` continues an interrupted search
with the time it had left, then trains the final run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cnnlab import dist, files, training
from cnnlab.budget import candidates as candidates_mod
from cnnlab.budget.pace import Clock, Deadline
from cnnlab.config import DataConfig, from_dict
from cnnlab.data.dataset import Dataset
from cnnlab.dist import World
from cnnlab.errors import CnnlabError, EveryProcessError, Interrupted
from cnnlab.evaluation.evaluate import tta_views
from cnnlab.run import Run
from cnnlab.training import tracking as tracking_mod

log = logging.getLogger("cnnlab.budget")

SEARCH_SHARE = 0.35  # of the budget for the trials; the rest trains the winner longer
TUNE_FULL = 600.0  # budgets this long or longer may tune for the whole search share, shorter ones for a part in
# proportion (after each candidate's recipe trial): at 2 minutes on CIFAR-10 the search spent 42 s on six trials
# of `quick` (the one candidate left) and its final 6 epochs scored 80.78%, where 8 epochs of the recipe: 82.12%
TRIAL_SHARE, TRIAL_MIN = 0.2, 2000  # trials train on this share of the training images, and at least this many:
# CIFAR-10 at 2 minutes, trials on all 42,500 images let one epoch of `fast` eat the whole search (169 s spent
# of 120); on a sample its trial costs a fifth, and the final run's pace is scaled up from it
TRIAL_STEPS = 20  # and at least this many steps of a candidate's batch: at 15 minutes on CIFAR-10 the trials of
# `fast` (batch 1,024) were 8 steps an epoch on the 8,500-image sample and scored 38% held out against `quick`'s
# 66%, so the search chose `quick` (84.63%) where `fast` alone reached 90.12% in the same time
HOLD_OUT = 0.15  # of the training images, when the data has no validation split of its own
SOLO_SHARE = 0.05  # of the budget for tuned trials when one candidate is left (its recipe trial, which measures
# its pace, may still start until SEARCH_SHARE): they can only tune its settings, a tuned one is chosen only when
# it beats the recipe by more than the held-out noise (search.NOISE), and each trial's seconds are the final
# run's. Measured: CIFAR-10 at 2 minutes, six trials of `quick` (42 s) and its final 6 epochs scored 80.78% where
# 8 epochs of the recipe: 82.12%; 5,000 photos at 15 minutes, 27 trials of photos@128 (315 s) and its final 32
# epochs scored 70.34%, where 50 epochs of the recipe alone: 71.74%; at 10%, 7 trials and 43 epochs: 70.94%
SCRATCH_IMAGES = 100_000  # a network from scratch trains at the largest size (the most seconds an epoch: `fast`
# over `quick`, photos at 128 px over 96 over 64) at which its final run sees this many training images in the
# final run's share at its step time here (the quickest if none does). Trials of a few epochs at equal time
# favour the smallest, which learns fastest, where a long final run gains more from a larger network or more
# pixels. Measured at equal wall clock: CIFAR-10, `fast` at 1 epoch (50,000 images) 76.47% against 12 of
# `quick`'s 83.20%, at 2 (100,000) 84.75% against 16 of `quick`'s 83.53%; 5,000 photos at 96 px, 10 epochs
# (50,000) 59.5% against 64 px's 64.0%, 25 epochs (125,000) 69.24% against 67.94%; 128 px at 14 epochs 63.66%,
# at 50 (250,000) 71.74% against 96 px's 72.22% (inside a standard error of 0.7). At 15 minutes on CIFAR-10 the
# search over both had chosen `quick` (84.62%) where `fast` alone reached 90.12%. A pretrained backbone needs
# one epoch to fit
MAX_EPOCHS = 100
SLACK = 0.07  # of the budget the final run may overrun its plan before it stops early: a schedule cut short ends
# at a high learning rate (CIFAR-10 at 2 minutes: `quick` planned for 2 epochs and stopped after 1 scored 25%)
PACE_MARGIN = 1.1  # the final run is planned at this many times its trials' pace: a schedule that the Deadline
# cuts short ends at a high learning rate, far worse than one epoch fewer (CIFAR-10 at 2 minutes: trials said
# ~12 s an epoch, the final run's took 13-14 s, and 7 of its 8 planned epochs scored 68.16%, where 6: 81.31%)
REPORT_SECONDS = 5.0  # report.html's figures, on top of a run's own end (measured: 3-5 s on 2 busy cores)
STATE = "budget.json"  # in search/: the budget, the time spent, the data settings (for --resume)


def parse(text: str) -> float:
    """'90s', '10m', '1.5h' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise CnnlabError(f"--budget {text!r} is not a duration such as 90s, 10m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def is_search(path: str | Path) -> bool:
    """Whether `path` is a --budget run (its search, perhaps its final run)."""
    return (Path(path) / Run.SEARCH / STATE).is_file()


def train_within(seconds: float, data_cfg: DataConfig, *, out=None, with_report: bool = True,
                 tracking: tuple[str, ...] = (), device: str = "auto", seed: int = 0, pretrained: str | None = None,
                 dry_run: bool = False) -> Path:
    """Search, then train the winner, within `seconds`; returns the run directory. Under torchrun every
    process calls it: process 0 keeps the study and the files, and every trial runs on all of them."""
    clock, world = Clock(seconds), dist.init(device)
    data_cfg = data_cfg.validate()
    run = Path(dist.broadcast(world, str(out if out is not None else Run.new_path("runs", "budget"))))
    state = {"seconds": seconds, "spent": 0.0, "data": asdict(data_cfg), "device": device, "seed": seed,
             "pretrained": pretrained, "dry_run": dry_run, "with_report": with_report, "tracking": list(tracking)}
    if world.main:
        Run.check_out(run)
        tracking_mod.check(list(tracking))
    ds = _load(data_cfg, state, clock)  # before the run directory: data that cannot be read leaves nothing
    if world.main:
        (run / Run.SEARCH).mkdir(parents=True, exist_ok=True)
        files.write_json(run / Run.SEARCH / STATE, state)
        if "mlflow" in tracking:  # the budget's MLflow run, made now: each trial is its child (tracking.py),
            tracking_mod.MLflow(run, {"preset": "budget", "budget": state}, None)  # the final run its own
    return _search_and_train(run, state, clock, world, ds)


def resume(run: str | Path) -> Path:
    """Continue an interrupted budget search with the time it had left, then train its winner."""
    run, world = Path(run), dist.init()
    state = dist.broadcast(world, json.loads((run / Run.SEARCH / STATE).read_text()) if world.main else None)
    if dist.broadcast(world, Run.is_run(run) if world.main else None):  # the final run had started: it resumes
        return training.resume(run, with_report=state["with_report"])  # as any run does
    clock = Clock(state["seconds"], spent=state["spent"])
    clock.say(f"resuming the search in {run}")
    return _search_and_train(run, state, clock, world)


def _load(data_cfg: DataConfig, state: dict, clock: Clock) -> Dataset:
    with clock.excluded("decoding into the cache"):
        return _read(data_cfg, state["seed"], held=False)


def _read(data_cfg: DataConfig, seed: int, held: bool = True) -> Dataset:
    """The data with its held-out split, as every candidate sees it; `held=False`: as the final run sees it."""
    ds = training.load_data(data_cfg, seed)
    return held_out(ds, seed) if held else ds


def _search_and_train(run: Path, state: dict, clock: Clock, world: World, ds: Dataset | None = None) -> Path:
    from cnnlab.budget.search import TRIAL_EPOCHS, Search  # optuna: imported when a budget run starts

    data_cfg = from_dict(DataConfig, state["data"])
    whole = ds or _load(data_cfg, state, clock)  # as the final run sees it
    ds = held_out(whole, state["seed"])  # as the trials see it
    found, epoch = _chosen(state, _candidates(state, ds, clock, world), whole, clock, world)
    if world.main:  # a resumed search keeps them: timed again, another candidate might win the step timing, and
        files.write_json(run / Run.SEARCH / STATE, state)  # the study's trials name the ones chosen first
    trial_data, made = {}, {}
    for c in found:  # candidates of one input size and sample size share their images
        key = (c.image_size, trial_size(c.cfg.batch_size, len(ds.y_train)))
        if key not in made:
            with clock.excluded("decoding into the cache"):
                made[key] = as_trial_data(_at_size(data_cfg, ds, c.image_size, state["seed"]), state["seed"], key[1])
        trial_data[c.name] = made[key]
    sample = {name: len(d.y_train) for name, d in trial_data.items()}
    longest = 1 if state["dry_run"] else TRIAL_EPOCHS
    on_sample = {name: epoch[name] * n / len(whole.y_train) for name, n in sample.items() if name in epoch}
    search = Search(run / Run.SEARCH, found, trial_data, clock, state["seed"], world, max_epochs=longest,
                    epochs=trial_epochs(found, on_sample, longest), tracking=tuple(state["tracking"]))
    tune = min(SEARCH_SHARE * min(1.0, clock.seconds / TUNE_FULL), SOLO_SHARE if len(found) == 1 else 1.0)
    usual = min(sample.values())
    larger = ", ".join(f"{name}: {n:,}" for name, n in sample.items() if n > usual)
    clock.say(f"{len(found)} candidates ({', '.join(c.name for c in found)}); trials on {usual:,}"
              + (f" ({larger})" if larger else "") + f" of the {len(ds.y_train):,} training images, scored on "
              f"{len(ds.y_val):,} held-out ones, until {SEARCH_SHARE:.0%} of the budget is spent (tuned ones until "
              f"{tune:.0%})")
    try:
        if state["dry_run"]:  # each candidate once, whatever the time: a smoke run of every path
            search.run(math.inf, trials=len(found), tune_until=math.inf)
        else:
            search.run(clock.deadline(SEARCH_SHARE), tune_until=clock.deadline(tune))
    except (Interrupted, KeyboardInterrupt):  # Ctrl-C in a trial or between two: the search continues with
        raise Interrupted(run) from None  # --resume, with the time it had left
    finally:
        if world.main:
            files.write_json(run / Run.SEARCH / STATE, {**state, "spent": clock.spent()})
    scale = {name: len(whole.y_train) / n for name, n in sample.items()}  # the final run trains on all of them
    tested = len(ds.y_test) / max(len(ds.y_val), 1)
    validated = len(whole.validation[1]) / max(len(ds.y_val), 1)  # its validation: the test set, unless the data
    # has a validation split of its own
    plan = dist.broadcast(world, _plan(run, state, clock, search, (scale, validated, tested)) if world.main else None)
    winner = search.candidates[plan["candidate"]]
    del search, trial_data, ds  # the trials' copies of the images are not needed any more
    return _train_winner(run, state, clock, winner, plan, data_cfg, whole)


def _candidates(state: dict, ds: Dataset, clock: Clock, world: World) -> list:
    """The candidates process 0 finds (its hub cache, and the preset's backbone if it can download it), the
    same on every process; weights not yet on a machine are fetched there first, outside the budget."""
    args = (ds.image_size, state["pretrained"], state["device"], state["seed"], ds.source_side)
    names = None
    if world.main:
        with clock.excluded("measuring the images' detail"):
            detail = candidates_mod.detail(ds.image_files("train"), ds.source_side, ds.resize, state["seed"])
        found, said = candidates_mod.for_data(*args, download=True, detail=detail)
        for line in said:
            log.info(f"budget: {line}")
        names = [c.name for c in _with_weights(found, clock)]
    names = dist.broadcast(world, names)
    if not world.main:
        found = _with_weights(candidates_mod.for_data(*args, require=tuple(names))[0], clock)
        if missing := set(names) - {c.name for c in found}:
            raise CnnlabError(f"budget: no weights for {', '.join(sorted(missing))} on this machine")
    by_name = {c.name: c for c in found}
    return [by_name[n] for n in names]


def _chosen(state: dict, found: list, ds: Dataset, clock: Clock, world: World) -> tuple[list, dict[str, float]]:
    """The candidates within reach (`_within_reach`), chosen once per search and kept in `state` (a resumed
    search on a busier machine had timed another photo size, and Optuna refused the changed choice of
    candidates: "CategoricalDistribution does not support dynamic value space")."""
    if "candidates" not in state:
        chosen, epoch = _within_reach(found, ds, clock, world, every=state["dry_run"])
        state["candidates"], state["epoch"] = [c.name for c in chosen], epoch
    by_name = {c.name: c for c in found}
    if missing := [name for name in state["candidates"] if name not in by_name]:
        raise EveryProcessError(f"budget: cannot resume the search: {', '.join(missing)} is no longer a candidate "
                                "on this machine (its backbone's weights were removed?)")
    return [by_name[name] for name in state["candidates"]], state["epoch"]


def _within_reach(found: list, ds: Dataset, clock: Clock, world: World, every: bool = False
                  ) -> tuple[list, dict[str, float]]:
    """The candidates within reach of the final run's share of the budget, and the seconds an epoch of each on
    all the training images takes, from its step time measured here and now (process 0 measures, every process
    keeps the same), by `reachable`. At 2 minutes on CIFAR-10 a trial of `fast` took 29 of the search's 40 s
    to learn what its step time says at once: its epoch (148 s) cannot fit. Head-only probes are
    cheap and not measured. `every` (a dry run, which tries each candidate once): all of them."""
    names, epoch = None, None
    # not counted, on every process alike (the others wait in the broadcast), so their clocks stay together;
    # counted, the timing left a busy machine's 30-s search no time
    with clock.excluded("timing each candidate's step"):
        if world.main:
            room = (1 - SEARCH_SHARE) * clock.seconds
            epoch = {c.name: _epoch_seconds(c, ds, world) for c in found if not c.cfg.head_only}
            names = [c.name for c in found] if every else reachable(found, epoch, room, len(ds.y_train))
            out = [name for name in epoch if name not in names]
            log.info(f"budget: an epoch of the {len(ds.y_train):,} training images here, from a step timed now: "
                     + ", ".join(f"{name} ~{seconds:.1f} s" for name, seconds in epoch.items())
                     + f"; the final run has {room:.1f} s"
                     + (f": leaving out {', '.join(out)} (too few epochs fit, or a larger network from scratch "
                        f"sees {SCRATCH_IMAGES:,} images)" if out else ""))
        names, epoch = dist.broadcast(world, (names, epoch))
    return [c for c in found if c.name in names], epoch


def reachable(found: list, epoch: dict[str, float], room: float, images: int) -> list[str]:
    """The names of the candidates within reach of `room` seconds at `epoch` seconds an epoch of `images`
    training images (a candidate not timed fits): a pretrained one where one epoch fits; of the networks from
    scratch one, the largest (the most seconds an epoch) at which the final run sees SCRATCH_IMAGES images,
    else the quickest where one epoch of it fits; the quickest of all if nothing fits."""
    least = max(1, math.ceil(SCRATCH_IMAGES / max(images, 1)))  # a network from scratch's epochs

    def fits(c, epochs: int) -> bool:
        return epoch.get(c.name, 0) * epochs <= room

    scratch = sorted((c for c in found if not c.cfg.pretrained), key=lambda c: epoch.get(c.name, 0))
    chosen = [c for c in scratch if fits(c, least)][-1:] or [c for c in scratch[:1] if fits(c, 1)]
    kept = [c.name for c in found if c in chosen or (c.cfg.pretrained and fits(c, 1))]
    return kept or [min(epoch, key=epoch.get)]


def trial_epochs(found: list, epoch: dict[str, float], longest: int) -> dict[str, int]:
    """Each candidate's trial length: `longest` epochs of the trial sample for the quickest, and for another as
    many as take the same time at its step time here (one at least), so that trials compare candidates as the
    final run will use them, at equal time, not equal epochs (at equal epochs, three of `photos` at 128 px
    scored above three at 64 px on 900 photos, and the final run's 3 epochs at 128 px: 46.5%, where 20 at 64 px
    took the same time for 66.1%). A head-only probe (not timed: cheap) gets `longest`."""
    quickest = min((epoch[c.name] for c in found if c.name in epoch), default=0.0)
    return {c.name: max(1, round(longest * quickest / epoch[c.name])) if c.name in epoch and epoch[c.name] > 0
            else longest for c in found}


def _epoch_seconds(candidate, ds: Dataset, world: World) -> float:
    """Seconds an epoch of `candidate` on all of `ds`'s training images takes here: its step timed for a third
    of a second (one step at least, after one warm-up) at the batch it will train with, at most 64 images and
    scaled from there (the convolutions' cost is linear in the batch). (Three steps of 128 images whatever the
    data took 50 s of a 60-s budget on a busy machine for a 20-image photo folder's MobileNet.)"""
    from cnnlab import doctor
    from cnnlab.device import pick_device, pick_precision

    cfg, size, n = candidate.cfg, candidate.image_size or ds.image_size, len(ds.y_train)
    device = pick_device(cfg.device)
    real = max(1, min(cfg.batch_size, -(-n // world.size)))  # a step's images on each process
    timed = min(real, 64)
    step = doctor.step_seconds(cfg, timed, device, pick_precision(cfg.precision, device), seconds=0.3, least=1,
                               image=(ds.x_train.shape[1], *size), classes=len(ds.classes)) * real / timed
    return step * -(-n // (real * world.size))


def _with_weights(found: list, clock: Clock) -> list:
    """The candidates whose ImageNet weights are here or could be downloaded now (not counted in the budget);
    a backbone whose download fails is left out, and the log says why."""
    from cnnlab.models import pretrained

    kept, failed = [], set()
    for c in found:
        model = c.cfg.model
        if c.cfg.pretrained == "imagenet" and model not in failed:
            try:
                with clock.excluded(f"downloading {model}'s weights"):
                    pretrained.fetch(model)
            except CnnlabError as e:
                log.info(f"budget: leaving out {model}: {e}")
                failed.add(model)
        if model not in failed or c.cfg.pretrained != "imagenet":
            kept.append(c)
    return kept


def _plan(run: Path, state: dict, clock: Clock, search, scales: tuple[float, float, float]) -> dict:
    """Process 0: the leaderboard said and written; the winner, its settings, and the epochs the time left fits
    at the pace its trials measured (`scales`: the final run's training images to each candidate's trial sample,
    its validation images and the test images to the held-out ones)."""
    scales_by_name, validated, tested = scales
    best = search.best()
    if best is None:
        raise EveryProcessError(f"no trial finished within the budget of {state['seconds']:.0f} s; give a larger "
                                "--budget (or --subset)")
    log.info("budget: leaderboard (held-out accuracy)\n" + search.leaderboard())
    search.write_csv(run / Run.TRIALS)
    pace = search.pace(best.candidate.name, scales_by_name[best.candidate.name], validated) or 1.0
    # the final evaluation of the test set with the recipe's test-time views (trials have none; tuning leaves
    # them as they are), at the pace of the trials' passes over the held-out split
    views = len(tta_views(torch.zeros(1, 1, 3, 3), best.candidate.cfg.tta))
    evaluation = views * search.val_seconds(best.candidate.name) * tested
    end = evaluation + REPORT_SECONDS * state["with_report"]
    kept = search.overhead(best.candidate.name) + end  # the start, the first epoch's one-time costs, the end
    fits = math.floor((clock.left() - kept) / (pace * PACE_MARGIN))
    epochs = 1 if state["dry_run"] else max(1, min(MAX_EPOCHS, fits))
    return {"candidate": best.candidate.name, "params": best.params, "epochs": epochs, "pace": pace, "kept": kept,
            "end": end + search.end_seconds(best.candidate.name)}


def _train_winner(run: Path, state: dict, clock: Clock, candidate, plan: dict, data_cfg: DataConfig,
                  ds: Dataset) -> Path:
    from cnnlab.budget.search import Choice

    cfg = Choice(candidate, plan["params"]).config(plan["epochs"])
    clock.say(f"final run: {candidate.name} for {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} of ~{plan['pace']:.1f} s "
              f"(lr {cfg.lr:.4g}, weight decay {cfg.weight_decay:.4g}, augment {cfg.augment}) on "
              f"{len(ds.y_train):,} training images" + (", the held-out ones given back" if ds.y_val is None else ""))
    final_ds = _at_size(data_cfg, ds, candidate.image_size, state["seed"], held=False)
    path = training.train(cfg, replace(data_cfg, image_size=candidate.image_size or data_cfg.image_size),
                          preset="budget", out=run, dataset=final_ds, with_report=state["with_report"],
                          tracking=tuple(state["tracking"]),
                          hooks=[Deadline(clock, reserve=plan["kept"] - SLACK * state["seconds"], world=dist.init(),
                                          aim=None if state["dry_run"] else plan["end"],
                                          least=cfg.freeze_epochs + 1, most=MAX_EPOCHS)])
    clock.say("done")
    return path


def held_out(ds: Dataset, seed: int) -> Dataset:
    """The data with a validation split: its own, or HOLD_OUT of the training images (stratified, seeded)."""
    return ds if ds.y_val is not None else ds.hold_out(HOLD_OUT, seed)


def trial_size(batch_size: int, images: int) -> int:
    """A trial's training images for a candidate of `batch_size` among `images`: TRIAL_SHARE of them, at least
    TRIAL_MIN and TRIAL_STEPS of its batches, at most all."""
    return min(images, max(TRIAL_MIN, round(TRIAL_SHARE * images), TRIAL_STEPS * batch_size))


def as_trial_data(ds: Dataset, seed: int, size: int | None = None) -> Dataset:
    """What a trial sees: a stratified sample of `size` training images (by default TRIAL_SHARE, at least
    TRIAL_MIN), and the held-out split as its test set, so no trial looks at the real one."""
    sample = ds.subset(size or trial_size(1, len(ds.y_train)), seed)
    return replace(sample, x_test=ds.x_val, y_test=ds.y_val, x_val=None, y_val=None, test_files=())


def _at_size(data_cfg: DataConfig, ds: Dataset, size: tuple[int, int] | None, seed: int,
             held: bool = True) -> Dataset:
    if size is None or tuple(size) == tuple(ds.image_size):
        return ds
    return _read(replace(data_cfg, image_size=size), seed, held)
