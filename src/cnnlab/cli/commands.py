"""The subcommands that need more than a line: each parses nothing (args.py did) and calls the Python API.

Modules are imported by the subcommand that needs them: `cnnlab predict model.onnx` and
`cnnlab serve model.onnx` run on onnxruntime and never import PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from cnnlab import presets
from cnnlab.cli.args import build_parser
from cnnlab.config import DataConfig, override
from cnnlab.errors import CnnlabError, EveryProcessError


def cmd_lr_find(args: argparse.Namespace) -> None:
    from cnnlab import data
    from cnnlab.evaluation import plots
    from cnnlab.training import lrfind
    from cnnlab.training.preflight import check_names

    cfg = check_names(_train_config(args))
    if args.start >= args.end:
        raise CnnlabError(f"--start ({args.start:g}) must be below --end ({args.end:g})")
    result = lrfind.find_lr(cfg, data.load(_data_config(args).validate()), start=args.start, end=args.end,
                            steps=args.steps)
    out = plots.save_figure(result.plot(), args.out)
    unit = " per 1024 examples, as this preset states its rates" if result.per_1024 else ""
    print(f"swept {len(result.lrs)} steps from {result.lrs[0]:.2g} to {result.lrs[-1]:.2g}; lowest smoothed loss "
          f"{min(result.losses):.4f}; steepest fall at {result.steepest:.2g}\n"
          f"suggested: --lr {result.flag_value:.3g}{unit}\nwrote {out}")


def _data_config(args: argparse.Namespace, **extra) -> DataConfig:
    return DataConfig(path=args.data, image_size=args.image_size, val_fraction=args.val_fraction,
                      label_mode=args.label_mode, class_names=args.class_names,
                      skip_bad_images=args.skip_bad_images, resize=args.resize, **extra)


def cmd_data_check(args: argparse.Namespace) -> int:
    """`cnnlab data check`: findings are not errors (exit 0); --strict exits 1 on leaks or conflicts."""
    import importlib.util

    from cnnlab.data import cache, check, check_page

    needed = ["imagehash"] + (["cleanlab"] if args.labels else [])
    if missing := [m for m in needed if importlib.util.find_spec(m) is None]:
        raise CnnlabError(f"cnnlab data check needs {' and '.join(missing)}: pip install 'cnnlab[check]'")
    for flag, path in (("--json", args.json), ("--html", args.html)):
        if path:
            _check_writable(flag, path)
    cfg = replace(_data_config(args), skip_bad_images=True).validate()  # unreadable files are a finding
    entry = cache.entry_for(cfg, verify=True)  # every image against its digest, whatever the entry's size
    found = check.check(entry, args.near)
    if args.labels:
        from cnnlab import data, labels

        found.label_suspects = labels.suspects(entry, data.load(cfg), args.folds, args.seed)
        found.labels_checked = True
    print(check.summary(found))
    if args.json:
        from cnnlab import files

        files.write_json(args.json, found.to_json())
        print(f"wrote {args.json}")
    if args.html:
        print(f"wrote {check_page.write_html(found, entry, args.html)}")
    return 1 if args.strict and found.serious else 0


def _check_writable(flag: str, path: str) -> None:
    """An output file's folder must exist and take files, and the path must not be a folder: checked before any
    data is read."""
    from cnnlab import files

    p = Path(path)
    if (kind := files.special_kind(p)) not in (None, "character device", "FIFO"):  # those are written through
        raise CnnlabError(f"{flag} {path} is a {kind}; give a file name")
    if not p.parent.resolve().is_dir():
        raise CnnlabError(f"{flag} {path}: the folder {p.parent} does not exist")
    if not os.access(p.parent.resolve(), os.W_OK):
        raise CnnlabError(f"{flag} {path}: cannot write in {p.parent}")


def _load(args: argparse.Namespace):
    from cnnlab import data

    return data.load(_data_config(args))


def _check_model(name: str | None) -> None:
    from cnnlab import models

    if name is not None:
        models.check(name)


def list_models() -> str:
    import torch

    from cnnlab import models
    from cnnlab.models import pretrained, spec

    lines = [f"{'name':<20}  {'parameters':>11}  --pretrained  (parameters at 32x32x3 inputs, 10 classes)"]
    for name in sorted(models.MODELS):
        with torch.device("meta"):  # counted without storage: the large backbones cost no time
            params = models.count_params(models.build(name), trainable_only=False)
        weights = pretrained.IMAGENET.get(name)
        lines.append(f"{name:<20}  {params:>11,}  " + (f"imagenet ({weights.top1:.1f}% top-1 at {weights.size} px)"
                                                       if weights else "file only"))
    return "\n".join(lines) + ("\n\n--pretrained imagenet fetches torchvision's weights; every network takes "
                               "--pretrained FILE (.pth, .pt, .safetensors)\n\nor a layer spec:\n") + \
        spec.__doc__.split("Grammar", 1)[1].split("\n", 1)[1]


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    if _launches(args) and "WORLD_SIZE" not in os.environ:  # the launcher's store client warns in C++, with a
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # stack, when another machine goes: we say it once
    from cnnlab import dist

    if args.resume:
        _check_resume_flags(args)
    if args.budget:
        _check_budget_flags(args)
    cfg = _train_config(args)  # checked by train()'s preflight, once
    if _launches(args) and "WORLD_SIZE" not in os.environ:
        from cnnlab.training.preflight import check_names

        check_names(cfg)  # before starting processes: one message, not one per process
        cfg.validate()
        dist.per_rank_batch(dist.World(size=(args.nproc or 1) * (args.nnodes or 1)), cfg.batch_size)
        os.environ["CNNLAB_DEVICE"] = cfg.device  # every process's collectives where the run computes (dist.init)
        if dist.backend_for(cfg.device) == "nccl":
            dist.check_gpus(args.nproc or 1)
        if cfg.pretrained == "imagenet":  # one download here, not one per process
            from cnnlab.models import pretrained

            pretrained.fetch(cfg.model)
        return dist.launch(_worker_argv(args, argv), args.nproc or 1, args.nnodes or 1, args.node_rank or 0,
                           args.rdzv_endpoint, args.max_restarts or 0)
    try:
        _train_or_resume(args, cfg)
    except EveryProcessError as e:
        _say_for_every_process(e)
        raise
    except BaseException:
        dist.close()  # no barrier: the other ranks may never reach it
        raise
    dist.close(together=True)
    return 0


def _say_for_every_process(e: EveryProcessError) -> None:
    """Every process stopped at the same step: process 0 says why before any of them leaves. (Once one process
    has exited, the launcher ends the others: process 0, ended before it printed, once left an empty stderr in
    `make test` beside two busy processes.)"""
    from cnnlab import dist

    if os.environ.get("LOCAL_RANK", "0") == "0":  # each machine's first process
        print(f"cnnlab: error: {e}", file=sys.stderr, flush=True)
    e.said = True
    try:
        dist.close(together=True)  # the others wait here until it has
    except Exception:  # a process group that failed: leave it as any other failure does
        dist.close()


RESUME_TAKES = {"command", "resume", "data", "no_report", "nproc", "epochs", "nnodes", "node_rank", "rdzv_endpoint",
                "max_restarts"}  # the rest is the run's own


def _given(args: argparse.Namespace, names) -> str:
    """Which of `names` the command line set to other than their defaults, as flags: "--lr, --model"."""
    defaults = vars(build_parser().parse_args(["train"]))
    return ", ".join("--" + k.replace("_", "-") for k in names if getattr(args, k, None) != defaults.get(k))


def _check_resume_flags(args: argparse.Namespace) -> None:
    """--resume continues a run with the settings it recorded: a flag it cannot honour is an error, not ignored."""
    if flags := _given(args, [k for k in vars(args) if k not in RESUME_TAKES]):
        raise CnnlabError(f"--resume continues {args.resume} with the settings it recorded, so {flags} cannot "
                          "apply (--resume takes --data, --epochs, --nproc and --no-report); to train with other "
                          f"settings, start a new run from its weights: cnnlab train --init-from {args.resume} ...")


BUDGET_CHOOSES = ("preset", "epochs", "model", "config", "resume", "nnodes", "max_restarts")
BUDGET_TAKES = ("device", "seed", "pretrained")  # of the training settings; the search chooses the rest


def _check_budget_flags(args: argparse.Namespace) -> None:
    """--budget picks the recipe, its settings and its epochs itself (on one machine: --nproc, not --nnodes)."""
    from dataclasses import fields

    from cnnlab.config import TrainConfig

    knobs = [f.name for f in fields(TrainConfig) if f.name not in BUDGET_TAKES and hasattr(args, f.name)]
    if flags := _given(args, [*BUDGET_CHOOSES, *knobs]):
        raise CnnlabError(f"--budget chooses the recipe, its settings and its epochs for this machine, so {flags} "
                          "cannot go with it (it takes --device, --seed and --pretrained)")


def _train_config(args: argparse.Namespace):
    """The preset, then the --config file, then each flag given: a TrainConfig (not yet validated)."""
    from dataclasses import fields, replace

    from cnnlab.config import TrainConfig

    base = presets.get(args.preset)
    if args.config:
        base = presets.from_toml(args.config, base)
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if flags.get("pretrained") == "none":  # from random weights, whatever the preset starts from
        flags["pretrained"], base = None, replace(base, pretrained=None)
    cfg = override(base, **flags)  # a flag left out is None: the file's or the preset's value stays
    if args.dry_run:  # one epoch, or the frozen ones and one more
        return override(cfg, epochs=args.epochs or (1 if cfg.head_only else cfg.freeze_epochs + 1))
    return cfg


def _train_or_resume(args: argparse.Namespace, cfg) -> None:
    from cnnlab import training

    if args.resume:
        from cnnlab import budget

        if budget.is_search(args.resume):  # a --budget run: its search, then its final run
            budget.resume(args.resume)
            return
        training.resume(args.resume, args.data, with_report=not args.no_report, epochs=args.epochs)
        return
    subset = (args.subset or 512) if args.dry_run else args.subset
    if args.budget:
        from cnnlab import budget

        budget.train_within(args.budget, _data_config(args, subset=subset, val_split=args.val_split), out=args.out,
                            with_report=not args.no_report, tracking=tuple(args.log or ()),
                            device=args.device or "auto", seed=args.seed or 0, pretrained=args.pretrained,
                            dry_run=args.dry_run)
        return
    training.train(cfg, _data_config(args, subset=subset, val_split=args.val_split), preset=args.preset,
                   out=args.out, with_report=not args.no_report, tracking=tuple(args.log or ()),
                   mlflow_uri=args.mlflow_uri)


LAUNCHER_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--max-restarts")  # the launcher's own


def _launches(args: argparse.Namespace) -> bool:
    """Whether this command starts the processes (torchrun's agent) rather than training in this one."""
    if (args.nnodes or 1) > 1 and not args.rdzv_endpoint:
        raise CnnlabError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT: where the machines meet")
    if args.rdzv_endpoint and (args.nnodes or 1) == 1:
        raise CnnlabError("--rdzv-endpoint is for several machines: add --nnodes N")
    if args.node_rank is not None and not args.node_rank < (args.nnodes or 1):
        raise CnnlabError(f"--node-rank {args.node_rank} must be below --nnodes {args.nnodes or 1}")
    return (args.nproc or 1) > 1 or (args.nnodes or 1) > 1 or bool(args.max_restarts)


def _worker_argv(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The command each process runs: this one without the launcher's flags; with restarts, a named --out, so
    that a restarted process 0 finds the run it was writing (lifecycle.elastic_restart)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCHER_FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in LAUNCHER_FLAGS)):
            out.append(a)
    if args.max_restarts and not args.out and not args.resume:
        from cnnlab.run import Run

        out += ["--out", str(Run.new_path("runs", args.preset))]
    return out


def cmd_summary(args: argparse.Namespace) -> None:
    from cnnlab import models

    _check_model(args.model)
    if args.data:
        ds = _load(args)
        shape, k = (ds.channels, *ds.image_size), ds.num_classes
    else:  # CIFAR-10's shape, without reading (or downloading) anything
        shape, k = (3, *(args.image_size or (32, 32))), 10
    model = models.build(args.model, shape[0], k, shape[1:])
    print(models.summary(model, shape))
    if warning := models.size_warning(model, shape[1:]):
        print(warning)


def cmd_runs(args: argparse.Namespace) -> None:
    from cnnlab import run

    if not args.compare:
        print(run.format_runs(run.list_runs(args.dir)))
        return
    from cnnlab.evaluation import plots  # matplotlib: only for --compare
    curves = {Path(path).name: run.Run(path).history() for path in args.compare}
    print(f"wrote {plots.save_figure(plots.plot_val_accuracy(curves), args.out)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cnnlab import deploy
    from cnnlab.deploy import pytorch
    from cnnlab.evaluation import evaluate

    if deploy.is_exported(args.run_dir):
        print(evaluate.format_metrics(pytorch.evaluate_exported(args.run_dir, args.data, args.runtime)))
        return
    print(evaluate.format_metrics(evaluate.evaluate_run(args.run_dir, args.data, device=args.device, out=args.out)))
    print(f"\nwrote metrics.json and confusion_matrix.csv/.json/.png in "
          f"{evaluate.results_folder(args.run_dir, args.data, args.out)}")


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnlab import deploy

    results = deploy.predict_files(args.run_dir, args.images, args.top_k, args.device,
                                   min_confidence=args.min_confidence, runtime=args.runtime)
    if not results:
        raise CnnlabError(f"no images found in {' '.join(args.images)}")
    if args.csv:
        _write_predictions_csv(args.csv, results, args.top_k)
    if args.json:
        print(json.dumps(results, indent=2))
    elif not args.csv:
        for r in results:
            if "predictions" in r:
                shown = ", ".join(f"{p['class']} {p['probability']:.3f}" for p in r["predictions"])
                print(f"{r['filename']}: {shown}" if r["label"] != deploy.UNKNOWN else
                      f"{r['filename']}: unknown (confidence {r['confidence']:.3f}, below --min-confidence; {shown})")
    else:
        print(f"wrote {len(results)} predictions to {args.csv}")
    return _unreadable(results, "classified")


def _write_predictions_csv(path: str, results: list[dict], k: int) -> None:
    import csv
    import io

    from cnnlab import files

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "label", "confidence",
                     *(f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "probability")), "error"])
    for r in results:
        cells = [c for p in r.get("predictions", []) for c in (p["class"], f"{p['probability']:.6f}")]
        answer = [r["label"], f"{r['confidence']:.6f}"] if "label" in r else ["", ""]
        writer.writerow([r["filename"], *answer, *cells, *[""] * (2 * k - len(cells)), r.get("error", "")])
    files.write_text(path, buf.getvalue())


def cmd_explain(args: argparse.Namespace) -> int:
    from cnnlab.evaluation import explain

    results = explain.explain_run(args.run_dir, args.images, args.out, args.class_name, args.layer, args.device)
    for r in results:
        if "overlay" in r:
            print(f"{r['filename']}: {r['predicted']} {r['probability']:.3f}; where it looked for {r['class']}: "
                  f"{r['overlay']}")
    return _unreadable(results, "explained")


def _unreadable(results: list[dict], done: str) -> int:
    """Exit status 2 with one line naming the files that could not be read, when any could not; else 0."""
    bad = [r for r in results if "error" in r]
    if not bad:
        return 0
    print(f"cnnlab: error: {len(bad)} of {len(results)} file(s) could not be read (the rest were {done}): "
          + "; ".join(r["error"] for r in bad[:10]) + ("; ..." if len(bad) > 10 else ""), file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> None:
    from cnnlab.deploy import serve

    if not 0 <= args.port <= 65535:
        raise CnnlabError(f"--port must be between 0 and 65535, got {args.port}")
    config = serve.ServeConfig(model=args.model, host=args.host, port=args.port, workers=args.workers,
                               max_upload_mb=args.max_upload_mb, max_files=args.max_files, device=args.device,
                               min_confidence=args.min_confidence, runtime=args.runtime)
    if args.dry_run:
        print(f"{args.model} would be served at {serve.check(config)} (dry run: the port is free, the model loads)")
        return
    serve.serve(config)
