"""A run's life: `train` makes a run directory and trains it; `resume` continues (or extends) one; both end
by writing the run's final weights, metrics and report. The loop itself is loop.py; this module is what
happens around it.

    run = train(presets.get("seed"), DataConfig(path="cifar10-jpeg"))   # returns the run directory
    resume(run)                                                           # after an interruption

    preflight (no data read)  ->  the data  ->  Run.create + config.json  ->  build  ->  fit (hooks)
      ->  the weights the run keeps (EMA, best or last)  ->  model.safetensors + model.json  ->  metrics, report

A seeded CPU run at a steady thread count (threads.py) is bit-for-bit repeatable, and a resumed run continues
exactly where the interrupted one stopped (data/loader.py, state.py). Under torchrun every process calls
`train`; process 0 alone writes the run directory and speaks.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from cnnlab import __version__, cluster, data, dist, hardware, models
from cnnlab.config import DataConfig, TrainConfig, from_dict
from cnnlab.data.dataset import Dataset, fingerprint
from cnnlab.device import memory_named, precision_name
from cnnlab.dist import World
from cnnlab.errors import CnnlabError, Interrupted
from cnnlab.evaluation import evaluate, report
from cnnlab.evaluation.analysis import Interpretation
from cnnlab.run import Run
from cnnlab.training import build, probe
from cnnlab.training import tracking as tracking_mod
from cnnlab.training.hooks import Hook, Validate
from cnnlab.training.keep import calibrate, cpu_weights, keep, model_meta
from cnnlab.training.loop import Stopped, fit
from cnnlab.training.optim import step_lr
from cnnlab.training.preflight import Plan, preflight
from cnnlab.training.threads import keeps_thread_count

log = logging.getLogger(__name__)


@keeps_thread_count
def train(cfg: TrainConfig, data_cfg: DataConfig | None = None, *, preset: str = "custom",
          out: str | Path | None = None, runs_root: str | Path = "runs", dataset: Dataset | None = None,
          with_report: bool = True, tracking: tuple[str, ...] = (), mlflow_uri: str | None = None,
          hooks: list[Hook] = ()) -> Path:
    """Train, evaluate and return the run directory. `dataset` skips loading (already in memory); `tracking`
    names experiment trackers ("tensorboard", "mlflow": see tracking.py); `hooks` extend the loop (loop.py)."""
    dist.init(cfg.device)  # first: the run's device chooses the backend of its processes
    if out is not None and elastic_restart(out):
        return resume(out, (data_cfg or DataConfig()).path, with_report=with_report, hooks=hooks)
    plan = preflight(cfg, data_cfg, out=out, tracking_kinds=tuple(tracking))
    ds = dataset or load_together(plan.world, lambda: load_data(plan.data, cfg.seed))
    if len(ds.y_train) == 0:
        raise CnnlabError(f"{ds.source} has no training images")
    created = out is None or not Path(out).exists()
    path = Run.create(out, runs_root, preset).path if plan.world.main else None
    run = Run(dist.broadcast(plan.world, str(path) if path else None))
    config = {"preset": preset, "train": asdict(cfg), "outputs": {"report": with_report, "tracking": list(tracking),
                                                                   "mlflow_uri": mlflow_uri},
              "data": data_record(plan.data, ds), "environment": environment(plan)}
    try:
        if plan.world.main:
            run.write_config(config)
            log.info(f"run directory: {run}" + (f" (on {cluster.host()})" if several_machines() else ""))
        trackers = make_trackers(run, config, plan.world)
        ended = train_run(plan, ds, run, None, trackers, list(hooks))
    except CnnlabError:
        if plan.world.main:
            run.discard(created)
        raise
    config["train"]["epochs"] = ended.get("epochs", cfg.epochs)  # as config.json says (hooks.Checkpoints)
    return finish(run, ds, plan.cfg, with_report, ended, trackers, config) if plan.world.main else run.path


@keeps_thread_count
def resume(run_dir: str | Path, data_path: str | None = None, *, with_report: bool = True,
           epochs: int | None = None, hooks: list[Hook] = ()) -> Path:
    """Continue an interrupted run from its last checkpoint; the result equals an uninterrupted run. With
    `epochs`, a run on a constant schedule is extended (or an unfinished one shortened) to that many epochs.

    The checkpoint holds the global state, so a run may resume under another number of processes.
    """
    world = dist.init()
    run = Run(run_dir)
    config, state, finished = read_run(run, world)
    cfg = from_dict(TrainConfig, config["train"]).validate()
    if epochs is not None and epochs != cfg.epochs:
        cfg, config = extend(run, config, cfg, state, epochs, world)
        finished = False
    data_cfg = from_dict(DataConfig, {**config["data"], **({"path": data_path} if data_path else {})})
    plan = preflight(cfg, data_cfg, resuming=True)
    ds = load_together(world, lambda: load_data(plan.data, cfg.seed))
    if ds.classes != config["data"]["classes"]:
        raise CnnlabError(f"the data at {ds.source} has other classes than the run was trained on")
    with_report = with_report and config.get("outputs", {}).get("report", True)
    if finished and (cfg.head_only or state is not None and state["epoch"] >= cfg.epochs):  # (probes: no checkpoints)
        return complete(run, ds, cfg, with_report, config) if world.main else run.path
    if state is None:
        log.info(f"{run} has no checkpoint yet (it stopped before the first one): starting from the beginning")
    else:
        log.info(f"resuming {run} at epoch {state['epoch'] + 1}, step {state['step']}")
    trackers = make_trackers(run, config, world)
    ended = train_run(plan, ds, run, state, trackers, list(hooks))
    config["train"]["epochs"] = ended.get("epochs", cfg.epochs)  # as config.json says (hooks.Checkpoints)
    return finish(run, ds, cfg, with_report, ended, trackers, config) if world.main else run.path


def train_run(plan: Plan, ds: Dataset, run: Run, state: dict | None, trackers, extra: list[Hook]) -> dict:
    """Build, fit, and commit the weights the run keeps (process 0). Returns what the end of the run needs:
    the final weights' test logits when the last validation computed them, the history, model.json."""
    with memory_named(plan.cfg.batch_size, plan.cfg.eval_batch_size):
        return _train_run(plan, ds, run, state, trackers, extra)


def _train_run(plan: Plan, ds: Dataset, run: Run, state: dict | None, trackers, extra: list[Hook]) -> dict:
    if plan.cfg.head_only:
        return probe.fit_head(plan, ds, run, trackers)
    cfg = plan.cfg
    ts, step, batches = build.build(plan, ds, state, run)
    hooks = build.default_hooks(plan, ds, run, batches, ts, trackers=trackers, new=state is None) + extra
    log.info(f"training {cfg.model} ({models.count_params(ts.model):,} parameters) on {len(ds.y_train):,} images, "
             f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)} of {batches.steps} steps; device {plan.device}, "
             f"{precision_name(plan.dtype)}; {lr_words(cfg)}"
             + (f"; {plan.world.size} processes of {dist.per_rank_batch(plan.world, cfg.batch_size)} images a step"
                if plan.world.distributed else ""))
    try:
        cfg = replace(cfg, epochs=fit(ts, batches, step, hooks, epochs=cfg.epochs, world=plan.world).epochs)
    except Stopped:  # (a hook may have re-planned the epochs: a time budget's final run)
        raise Interrupted(run.path) from None
    if ts.ema is not None:  # the run's weights are the average from here on (the checkpoint keeps both)
        ts.model.load_state_dict(ts.ema.state_dict())
    held = next(h for h in hooks if isinstance(h, Validate)).last_logits
    kept = keep(plan, ds, run, ts)
    if kept != (ts.history[-1]["epoch"] if ts.history else 0):
        held = None  # those were the last epoch's: the kept weights are evaluated and calibrated afresh
    meta, test_logits = None, None
    if plan.world.main:
        calibrated, held = calibrate(plan, ds, ts.model, ts.norm, held)
        test_logits = held if ds.y_val is None else None
        meta = {**model_meta(cfg, ds, ts.norm, ts.model, plan.dtype, ts.history), "epoch": kept,
                "best_epoch": ts.best.get("epoch"), "calibration": calibrated}
        run.save_model(cpu_weights(ts.model), meta)
    return {"test_logits": test_logits, "history": ts.history, "meta": meta, "epochs": cfg.epochs}


def lr_words(cfg: TrainConfig) -> str:
    """The learning rate as the log states it: per-1024 rates say so, with what a step of this batch takes."""
    if not cfg.per_1024:
        return f"lr {cfg.lr:g}"
    return f"lr {cfg.lr:g} per 1024 examples ({step_lr(cfg):.4g} a step at batch {cfg.batch_size})"


# ---------------------------------------------------------------------------------------------------
# The end of a run


def finish(run: Run, ds: Dataset, cfg: TrainConfig, with_report: bool, ended: dict | None = None, trackers=None,
           config: dict | None = None) -> Path:
    """Write metrics, confusion matrix and report of the final weights, say where they are. What training holds
    (the test logits of its last validation, the history, model.json, config.json) is handed on, not re-read."""
    ended = ended or {}
    if ended.get("test_logits") is not None:
        interp = Interpretation.from_logits(ds, ended["test_logits"], history=ended["history"], augment=cfg.augment,
                                            calibrated=ended["meta"]["calibration"])
    else:
        interp = Interpretation.from_run(run, dataset=ds, device=cfg.device)
    # the calibration computed once, the report draws the same figures (confusion_matrix.png among them)
    result = evaluate.save_metrics(run, interp.logits, interp.y_true, interp.classes, ds.source, False,
                                   interp.calibration())
    log.info(evaluate.format_metrics(result))
    outputs = [Run.WEIGHTS, Run.METRICS, Run.HISTORY_CSV]
    if with_report:
        report.write_report(run, interp, config=config, meta=ended.get("meta"))
        outputs += Run.PICTURES
    if trackers is not None:
        trackers.finish(run.path, result, interp.plot_confusion_matrix)  # drawn only if a tracker shows it
    log.info(f"\nrun directory: {run}")
    for name in outputs:
        log.info(f"  {name:<22}{run.file(name)}")
    return run.path


def complete(run: Run, ds: Dataset, cfg: TrainConfig, with_report: bool, config: dict) -> Path:
    """A run whose weights are committed and verified: write again whatever of the end of the run is missing
    (a kill or a full disk after the weights), or say that nothing is."""
    missing = run.missing_end(with_report)
    if not missing:
        wanted = [*Run.END_FILES, *(Run.PICTURES if with_report else [])]
        log.info(f"{run} is complete: all {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} trained, its weights "
                 f"verified, {', '.join(wanted)} present")
        return run.path
    log.info(f"{run} finished training; writing what its end left missing: {', '.join(missing)}")
    return finish(run, ds, cfg, with_report, config=config)


# ---------------------------------------------------------------------------------------------------
# The data, the configuration, the run directory


def load_data(data_cfg: DataConfig, seed: int) -> Dataset:
    """The data a run trains on: the data set, its unreadable files reported, --subset applied."""
    ds = data.load(data_cfg)
    if ds.skipped:
        log.info(f"warning: skipped {len(ds.skipped)} unreadable image file(s) (recorded in config.json): "
                 + "; ".join(ds.skipped[:3]) + ("; ..." if len(ds.skipped) > 3 else ""))
    if copies := sum(ds.exact_copies.values()):
        held = " and ".join(s for s, n in ds.exact_copies.items() if n)
        log.info(f"warning: {copies} training image(s) have exactly the pixels of {held} images, so the {held} "
                 f"score flatters the model (recorded in config.json); see `cnnlab data check --data {ds.source}`")
    # --val-split was held out by the cache (data.load), before the subset: the held-out images never depend on
    # the training seed, and they are decoded apart rather than copied out of the mapped training set
    _classes_left(ds, "--val-split" if data_cfg.val_split else None)
    if data_cfg.subset and data_cfg.subset < ds.num_classes:
        raise CnnlabError(f"--subset {data_cfg.subset} is fewer images than the {ds.num_classes} classes: every "
                          "class needs a training image")
    return ds.subset(data_cfg.subset, seed) if data_cfg.subset else ds


def _classes_left(ds: Dataset, cause: str | None) -> None:
    """Classes without a training image: refused when a flag took their images away, else a warning (a model
    can never predict them)."""
    counts = torch.bincount(ds.y_train, minlength=ds.num_classes)
    empty = [ds.classes[k] for k in torch.nonzero(counts == 0).flatten().tolist()]
    if not empty:
        return
    shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
    if cause:
        raise CnnlabError(f"{cause} leaves {len(empty)} of {ds.num_classes} classes without a training image "
                          f"({shown}): hold out a smaller share")
    log.info(f"warning: {len(empty)} of {ds.num_classes} classes have no training image ({shown}): the model "
             "can never predict them")


def load_together(world: World, load) -> Dataset:
    """Every process reads the data (the first on each machine decodes it into that machine's cache, the others
    wait on the cache's lock and map the result), waiting for each other outside any collective's timeout
    (dist.together); then they check that every machine has the same data."""
    ds = dist.together(world, "reading the data", load)
    dist.agree(world, "data", fingerprint(ds))
    return ds


def elastic_restart(out: str | Path) -> bool:
    """Under torchrun's elastic agent, whether `out` is this job's own run, left by a process group that the
    agent restarted after a worker died: then every process resumes it. Process 0 decides, by the job identity
    its config.json records (cluster.job: the agent's host, process and rendezvous id, the same for each
    restart); any other run at `out` stays refused, as without restarts."""
    if cluster.job() is None:
        return False
    world = dist.init()
    mine = False
    if world.main and Run.is_run(out):
        mine = Run(out).config().get("environment", {}).get("job") == cluster.job()
    restart = dist.broadcast(world, mine)
    if restart:
        log.info(f"the process group was restarted (torchrun --max-restarts): resuming {out}")
    return restart


def several_machines() -> bool:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1) < int(os.environ.get("WORLD_SIZE", 1) or 1)


def make_trackers(run: Run, config: dict, world: World) -> tracking_mod.Trackers | None:
    """Process 0's experiment trackers, as the run's configuration asks (None when it asks for none)."""
    outputs = config.get("outputs", {})
    kinds = outputs.get("tracking") or []
    if not (world.main and kinds):
        return None
    return tracking_mod.Trackers(run.path, kinds, config, outputs.get("mlflow_uri"))


def data_record(data_cfg: DataConfig, ds: Dataset) -> dict:
    """config.json's "data": the data settings and what was found there."""
    return {**asdict(data_cfg), "path": ds.source, "format": ds.format, "split": ds.split, "classes": ds.classes,
            "train_images": len(ds.y_train), "test_images": len(ds.y_test),
            "val_images": len(ds.y_val) if ds.y_val is not None else None, "skipped_images": list(ds.skipped),
            "exact_copies_of_held_out": ds.exact_copies, "validation": validation_words(data_cfg, ds)}


def validation_words(data_cfg: DataConfig, ds: Dataset) -> str:
    """Where the run's validation images come from, as config.json and the report say it."""
    if ds.y_val is None:
        return "the test set (as the tutorial does)"
    if data_cfg.val_split is None:  # the data's own validation split: a val/ (valid/, validation/) folder
        return f"the data's own validation split, {len(ds.y_val)} images"
    return (f"stratified {data_cfg.val_split:.0%} of the training images (seed {data_cfg.split_seed}), "
            f"{len(ds.y_val)} images")


def environment(plan: Plan) -> dict:
    """Where and when the run was trained, for the report (not where the report is later written)."""
    return {"started": time.strftime("%Y-%m-%d %H:%M"), "cnnlab": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu": hardware.cpu_model(),
            "cpu class": hardware.cpu_class(), "threads": torch.get_num_threads(), "device": plan.device.type,
            "processes": plan.world.size, "precision": precision_name(plan.dtype), "job": cluster.job()}


def read_run(run: Run, world: World) -> tuple[dict, dict | None, bool]:
    """Process 0 reads the run's config, newest intact checkpoint and whether it has its final weights."""
    config, state, finished = None, None, False
    if world.main:  # only process 0's machine need hold the run directory
        config = run.config()
        run.remove_leftovers()
        state = run.load_checkpoint()
        finished = run.model_complete()  # committed and intact; else written again from the state
    return dist.broadcast(world, (config, state, finished))


def extend(run: Run, config: dict, cfg: TrainConfig, state: dict | None, epochs: int,
           world: World) -> tuple[TrainConfig, dict]:
    """`--resume RUN --epochs N`: the run continues to N epochs, as if it had been started with N."""
    done = len(state["history"]) if state else 0
    if cfg.schedule not in ("constant", "plateau") or cfg.warmup:  # a warm-up is a share of all the steps too
        shape = f"a {cfg.warmup:g} warm-up" if cfg.schedule in ("constant", "plateau") else f"a {cfg.schedule}"
        raise CnnlabError(f"{run} follows {shape} learning-rate schedule, whose shape depends "
                          f"on the number of epochs, so it cannot be extended; start a new run from its weights: "
                          f"cnnlab train --init-from {run} --epochs N ...")
    if state is not None and done < state["epoch"]:
        raise CnnlabError(f"{run} stopped early at epoch {done} (--early-stopping); start a new run from its "
                          f"weights to train further: cnnlab train --init-from {run} ...")
    if epochs < done:
        raise CnnlabError(f"{run} has already trained {done} epochs; --epochs must be at least that")
    config = run.set_epochs(epochs, config, write=world.main)
    log.info(f"{run}: {cfg.epochs} -> {epochs} epochs")
    return replace(cfg, epochs=epochs), config
