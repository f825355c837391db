"""The search of `--budget`: short trials of the candidates on a held-out split of the training images (the
test set is never seen), in an Optuna study kept in SQLite beside the run, so an interrupted search resumes.

    search = Search(folder, candidates, trial_data, clock, seed)
    search.run(until=clock.deadline(SEARCH_SHARE),      # trials until that share of the budget is spent,
               tune_until=clock.deadline(tune))         # tuned ones (after the recipe trials) until a part of it
    best = search.best()                                 # the candidate and its settings; search.pace(best)

Each candidate is first tried at its recipe's own settings (enqueued), then Optuna's TPE sampler proposes a
candidate with a learning-rate factor, a weight-decay factor and an augmentation strength (the recipe's or
stronger: AUGMENT_FLOOR). A trial trains on
a stratified sample of the training images (budget.as_trial_data; at least TRIAL_STEPS batches of the
candidate's, so a large-batch recipe is not judged on a few steps) for up to TRIAL_EPOCHS epochs (its schedule
sized to them; a slower candidate for fewer, the same time: budget.trial_epochs) and reports its held-out
accuracy after each, at a step counted in the quickest candidate's epochs; Optuna's successive-halving pruner
stops, after the first step, a trial that is not in the best third of those seen there, so poor candidates
cost one epoch. Every trial ends as a row of `trials.csv` (the leaderboard).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cnnlab import dist, files, training
from cnnlab.budget.candidates import Candidate
from cnnlab.budget.pace import Clock, Deadline
from cnnlab.config import DataConfig
from cnnlab.data.dataset import Dataset
from cnnlab.dist import World
from cnnlab.errors import CnnlabError
from cnnlab.training.hooks import Hook

log = logging.getLogger("cnnlab.budget")

RECIPE = {"lr_factor": 1.0, "weight_decay_factor": 1.0, "augment_strength": 1}  # a candidate's own settings
AUGMENT_FLOOR = 1  # tuned augmentation is the recipe's own (1) or stronger (2: random erasing added), never flips
# only (0): a trial is a few epochs and the final run many, and short trials reward less regularization. At 15
# minutes on 5,000 photos the 11 best of 78 trials (3 epochs each) had flips only; the final run with them trained
# 100 epochs at 64 px for 67.32%, where the 5-minute run's 43 epochs with the recipe's flips and crops scored 69.04%
TRIAL_EPOCHS = 3  # the longest trial: successive halving's rungs at 1 and 3 epochs (reduction factor 3)
NOISE = 1.0  # standard errors by which a tuned trial must beat its candidate's recipe trial to be chosen (Search.best):
# one is 2.6 points on the 750 held-out images of 5,000 photos, 0.8 on CIFAR-10's 7,500
COLUMNS = ["trial", "candidate", "lr", "weight_decay", "augment", "epochs", "held_out_accuracy", "seconds", "state"]


def is_recipe(trial) -> bool:
    """Whether a trial ran at its candidate's own settings (its recipe trial)."""
    return all(trial.params.get(k) == v for k, v in RECIPE.items())


def noise(trial) -> float:
    """The standard error of a difference of two held-out accuracies near this trial's, on as many held-out
    images as it was scored on (0 where that is not known)."""
    n, p = trial.user_attrs.get("held_out_images", 0), trial.value
    return math.sqrt(2 * p * (1 - p) / n) if n else 0.0


@dataclass
class Choice:
    candidate: Candidate
    params: dict  # lr_factor, weight_decay_factor, augment_strength

    def config(self, epochs: int):
        cfg = self.candidate.tuned(self.params["lr_factor"], self.params["weight_decay_factor"],
                                   self.params["augment_strength"])
        return replace(cfg, epochs=max(epochs, cfg.freeze_epochs + 1))


class Report(Hook):
    """A trial's held-out accuracy after each epoch, to Optuna (process 0); the pruner's verdict, the same on
    every process, ends the run there. A candidate's recipe trial is pruned as any other: kept whole, `fast`'s
    took 78 of the 118 s of a 5-minute search on CIFAR-10 to end below `quick`'s three epochs all the same."""
    order = 96

    def __init__(self, trial: optuna.Trial | None, world: World, per_epoch: float = 1.0):
        self.trial, self.world, self.pruned = trial, world, False
        self.per_epoch = per_epoch  # steps (the quickest candidate's epochs) an epoch of this trial is worth

    def end_epoch(self, fit) -> None:
        prune = False
        if self.trial is not None:
            self.trial.report(fit.record["val_acc"], max(1, round(fit.record["epoch"] * self.per_epoch)))
            prune = fit.record["epoch"] < fit.epochs and self.trial.should_prune()
        if dist.any_rank(self.world, prune, fit.state.device):
            fit.stop_early, self.pruned = True, True


class Search:
    """Process 0 keeps the study; under several processes every trial runs on all of them, one at a time,
    with the settings process 0 drew."""

    def __init__(self, folder: Path, candidates: list[Candidate], trial_data: dict, clock: Clock, seed: int,
                 world: World, max_epochs: int = TRIAL_EPOCHS, tracking: tuple[str, ...] = (),
                 epochs: dict[str, int] | None = None):
        self.folder, self.clock, self.world, self.max_epochs = folder, clock, world, max_epochs
        self.epochs = {name: min(n, max_epochs) for name, n in (epochs or {}).items()}  # a trial's, per candidate
        self.tracking = tracking  # each trial a child run of the budget's (MLflow), or a subfolder (TensorBoard)
        self.candidates = {c.name: c for c in candidates}
        self.trial_data: dict[str, Dataset] = trial_data  # per candidate: its test set is the held-out split
        self.study = None
        if world.main:
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # its trial lines: we say them
            self.study = optuna.create_study(
                study_name="budget", storage=f"sqlite:///{folder / 'study.db'}", load_if_exists=True,
                direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3))
            self._close_interrupted()
            for name in self.candidates:  # every candidate first at its recipe's own settings
                if not any(t.params.get("candidate") == name or t.system_attrs.get("fixed_params", {}).get(
                        "candidate") == name for t in self.study.trials if t.state != TrialState.FAIL):
                    self.study.enqueue_trial({"candidate": name, **RECIPE})

    def _close_interrupted(self) -> None:
        """A resumed search: a trial that Ctrl-C or a kill cut short (still running in the study, perhaps with
        only some of its settings drawn) ends as failed; its candidate is queued again if it has no other."""
        for t in self.study.trials:
            if t.state == TrialState.RUNNING:
                self.study.tell(t.number, state=TrialState.FAIL)

    def run(self, until: float, trials: int | None = None, tune_until: float | None = None) -> None:
        """Trials until the monotonic time `until` (none started that the measured pace says cannot end
        before it), or `trials` of them; tuned trials (after each candidate's recipe trial) until `tune_until`."""
        tune_until = until if tune_until is None else min(tune_until, until)
        done = 0
        while dist.broadcast(self.world, self.world.main and (trials is None or done < trials)
                             and self._room_for_one(until, tune_until)):
            recipe = dist.broadcast(self.world, self.world.main and self._recipe_queued())
            trial = self.study.ask() if self.world.main else None  # (a queued recipe trial comes first)
            drawn = dist.broadcast(self.world, self._draw(trial) if trial is not None else None)
            try:  # (each process's own monotonic times: machines' clocks differ)
                accuracy, pruned = self.objective(trial, drawn, until if recipe else tune_until)
            except CnnlabError as e:
                log.info(f"budget: trial {drawn['number']} failed: {e}")
                accuracy, pruned = None, None
            if trial is not None:
                state = (TrialState.FAIL if pruned is None else
                         TrialState.PRUNED if pruned else TrialState.COMPLETE)
                self.study.tell(trial, None if state != TrialState.COMPLETE else accuracy, state=state)
                self.write_csv()
            done += 1

    def _room_for_one(self, until: float, tune_until: float) -> bool:
        """Whether another trial can start. A candidate not tried yet (its recipe trial still queued) starts while
        one epoch at the quickest pace seen still fits: its own Deadline ends it after the first epoch that
        leaves no room, and a search that never saw a candidate cannot choose it. (Counting the trials' median
        overhead there, the first epoch's one-time costs included, left a busy machine's 30-s photo search with
        its second input size untried.) A tuned trial starts only when the quickest candidate's whole trial fits
        before `tune_until`."""
        paces = [self.pace(name) for name in self.candidates]
        known = [p for p in paces if p is not None]
        quickest = min(known, default=0.0)
        if self._recipe_queued():
            return time.monotonic() + quickest < until
        cheapest = quickest if len(known) == len(paces) else 0.0
        return time.monotonic() + cheapest + self.overhead() < tune_until

    def _recipe_queued(self) -> bool:
        """Whether a candidate's recipe trial waits in the study (Optuna's ask() hands it out next)."""
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _draw(self, trial: optuna.Trial) -> dict:
        return {"number": trial.number, "candidate": trial.suggest_categorical("candidate", list(self.candidates)),
                "lr_factor": trial.suggest_float("lr_factor", 0.3, 3.0, log=True),
                "weight_decay_factor": trial.suggest_float("weight_decay_factor", 0.3, 3.0, log=True),
                "augment_strength": trial.suggest_int("augment_strength", AUGMENT_FLOOR, 2)}

    def objective(self, trial: optuna.Trial | None, drawn: dict, until: float) -> tuple[float, bool]:
        """Train one trial (on every process) until the monotonic time `until` at the latest; its best held-out
        accuracy, and whether it was pruned."""
        choice = Choice(self.candidates[drawn["candidate"]], drawn)
        # without test-time augmentation: trials compare candidates alike, and the last validation of a `fast`
        # trial with its 6 views took 25 of its 51 s at 2 minutes on CIFAR-10 (19 s were training)
        epochs = self.epochs.get(choice.candidate.name, self.max_epochs)
        cfg = replace(choice.config(epochs), tta=0)
        ds = self.trial_data[choice.candidate.name]
        report = Report(trial, self.world, per_epoch=max(1.0, self.max_epochs / cfg.epochs))
        deadline = Deadline(self.clock, share=(until - self.clock.deadline(0)) / self.clock.seconds, world=self.world)
        t0 = time.monotonic()
        run = training.train(cfg, DataConfig(path=ds.source, image_size=choice.candidate.image_size), dataset=ds,
                             out=self.folder / f"trial-{drawn['number']:03d}", with_report=False,
                             tracking=self.tracking, hooks=[report, deadline])
        seconds, end = time.monotonic() - t0, time.monotonic() - deadline.last  # (end: after its last epoch)
        if trial is None:
            return 0.0, report.pruned
        history = json.loads((run / "history.json").read_text())
        accuracy = max(h["val_acc"] for h in history)
        # the pace now is the last epoch's: the first carries one-time costs (at 2 minutes on CIFAR-10 `quick`'s
        # three took 2.46, 2.30 and 1.89 s), which `overhead` counts once, and the last is the machine's speed now
        last = history[-1]
        for key, value in (("seconds", round(seconds, 1)), ("epochs", len(history)), ("accuracy", accuracy),
                           ("epoch_seconds", round(last["seconds"] + last.get("val_seconds", 0), 2)),
                           ("train_seconds", round(last["seconds"], 2)),
                           ("val_seconds", round(last.get("val_seconds", 0), 2)), ("end_seconds", round(end, 2)),
                           ("held_out_images", len(ds.y_test))):
            trial.set_user_attr(key, value)
        self.clock.say(f"trial {trial.number} {choice.candidate.name} (lr x{drawn['lr_factor']:.2f}, weight "
                       f"decay x{drawn['weight_decay_factor']:.2f}, augment {cfg.augment}): {accuracy:.2%} held "
                       f"out after {len(history)} epoch{'s' * (len(history) != 1)}"
                       + (" (pruned)" if report.pruned else "") + f" in {seconds:.0f} s")
        return accuracy, report.pruned

    def pace(self, name: str, scale: float = 1.0, validated: float = 1.0) -> float | None:
        """Seconds an epoch of candidate `name` took in its trials (training and validation), None if untried;
        with `scale` and `validated`, for that many times the trials' training and validation images."""
        seen = [t.user_attrs["epoch_seconds"] + (scale - 1) * t.user_attrs.get("train_seconds", 0)
                + (validated - 1) * t.user_attrs.get("val_seconds", 0)
                for t in self.study.trials if t.params.get("candidate") == name and "epoch_seconds" in t.user_attrs]
        return sum(seen) / len(seen) if seen else None

    def val_seconds(self, name: str) -> float:
        """Seconds one pass over the held-out split took in candidate `name`'s trials (0 if untried)."""
        seen = [t.user_attrs.get("val_seconds", 0) for t in self.study.trials
                if t.params.get("candidate") == name and "epoch_seconds" in t.user_attrs]
        return sum(seen) / len(seen) if seen else 0.0

    def overhead(self, name: str | None = None) -> float:
        """Seconds a trial took besides its epochs at the last one's pace (start, the first epoch's one-time costs,
        BatchNorm statistics, the end of the run): the most seen for candidate `name`, or the median over all."""
        seen = sorted(t.user_attrs["seconds"] - t.user_attrs["epochs"] * t.user_attrs["epoch_seconds"]
                      for t in self.study.trials if "epoch_seconds" in t.user_attrs
                      and (name is None or t.params.get("candidate") == name))
        if not seen:
            return 0.0
        return max(seen) if name is not None else seen[len(seen) // 2]

    def end_seconds(self, name: str) -> float:
        """Seconds the end of a trial of candidate `name` took, after its last epoch (best weights, calibration,
        the weights written): the most seen."""
        seen = [t.user_attrs.get("end_seconds", 0.0) for t in self.study.trials
                if t.params.get("candidate") == name and "epoch_seconds" in t.user_attrs]
        return max(seen, default=0.0)

    def best(self) -> Choice | None:
        """The candidate with the best held-out accuracy, at its recipe's settings unless a tuned trial of it beat
        them by more than NOISE standard errors of a difference of two held-out accuracies: the best of several
        short tuned trials beats the recipe by chance alone (on 750 held-out photos one standard error is 2.6
        points), and the final run, many times longer than a trial, would keep settings that only the draw of the
        held-out images favoured."""
        complete = [t for t in self.study.trials if t.state == TrialState.COMPLETE  # (a resumed search may have
                    and t.params.get("candidate") in self.candidates]  # left out a candidate tried before)
        if not complete:
            return None
        kept = {}  # per candidate: its best trial, or its recipe's where that best is within the noise of it
        for name in dict.fromkeys(t.params["candidate"] for t in complete):
            mine = [t for t in complete if t.params["candidate"] == name]
            top, recipe = max(mine, key=lambda t: t.value), next((t for t in mine if is_recipe(t)), None)
            kept[name] = recipe if recipe and top.value - recipe.value <= NOISE * noise(recipe) else top
        t = max(kept.values(), key=lambda t: t.value)
        return Choice(self.candidates[t.params["candidate"]], {k: v for k, v in t.params.items() if k != "candidate"})

    def rows(self) -> list[dict]:
        rows = []
        for t in self.study.trials:
            if t.params.get("candidate") not in self.candidates or not RECIPE.keys() <= t.params.keys():
                continue  # another search's candidate, or a trial interrupted while its settings were drawn
            c = Choice(self.candidates[t.params["candidate"]], t.params).config(self.max_epochs)
            accuracy = t.user_attrs.get("accuracy")
            rows.append({"trial": t.number, "candidate": t.params["candidate"], "lr": f"{c.lr:.4g}",
                         "weight_decay": f"{c.weight_decay:.4g}", "augment": c.augment,
                         "epochs": t.user_attrs.get("epochs", ""),
                         "held_out_accuracy": "" if accuracy is None else f"{accuracy:.4f}",
                         "seconds": t.user_attrs.get("seconds", ""), "state": t.state.name.lower()})
        return sorted(rows, key=lambda r: -float(r["held_out_accuracy"] or -1))

    def write_csv(self, path: Path | None = None) -> Path:
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows())
        path = path or self.folder / "trials.csv"
        files.write_text(path, out.getvalue())
        return path

    def leaderboard(self, top: int = 10) -> str:
        lines = [f"  {'candidate':<34} {'lr':>8} {'wd':>8} {'augment':<24} {'epochs':>6} {'held out':>8} {'s':>5}"]
        for r in self.rows()[:top]:
            acc = f"{float(r['held_out_accuracy']):.2%}" if r["held_out_accuracy"] else "-"
            lines.append(f"  {r['candidate']:<34} {r['lr']:>8} {r['weight_decay']:>8} {r['augment']:<24} "
                         f"{r['epochs']!s:>6} {acc:>8} {r['seconds']!s:>5}  {r['state']}")
        return "\n".join(lines)
