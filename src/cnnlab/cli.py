"""The `cnnlab` command: a thin layer over the Python API (each subcommand calls one function).

Modules are imported by the subcommand that needs them: `cnnlab predict model.onnx` and
`cnnlab serve model.onnx` run on onnxruntime and never import PyTorch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cnnlab import __version__, presets
from cnnlab.config import MAX_IMAGE_SIDE, DataConfig, override, to_toml
from cnnlab.errors import CnnlabError, EveryProcessError, Interrupted

MODEL_HELP = "a name from `cnnlab models` or a layer spec such as c32-p-c64-p-f-d128"


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of class names")
    return names


def _fraction(text: str) -> float:
    """A share: above 0, below 1."""
    return _unit(text, zero=False)


def _below_one(text: str) -> float:
    """A decay or a factor: from 0, below 1."""
    return _unit(text, zero=True)


def _unit(text: str, zero: bool) -> float:
    value = _non_negative_float(text)
    if value >= 1 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"must be {'from 0' if zero else 'above 0'} to below 1, got {value}")
    return value


def _budget(text: str) -> float:
    from cnnlab.budget import parse

    try:
        return parse(text)
    except CnnlabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {value}")
    return value


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x")) if "x" in text.lower() else (int(text),) * 2
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 32 or 32x48") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 32 or 32x48")
    if max(h, w) > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(f"{text!r} is larger than {MAX_IMAGE_SIDE} px per side")
    return h, w


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="PATH", help="CIFAR-10 archive or folder, or an image-folder tree "
                   "(default: $CNNLAB_DATA, ~/.cache/cnnlab, ~/.keras/datasets, else download)")
    p.add_argument("--image-size", type=_size, metavar="HxW",
                   help="input size (default: images up to 64 px keep their size, larger ones become 96x96)")
    p.add_argument("--resize", choices=["crop", "pad", "squish"], default="crop",
                   help="how images reach that size: crop (default; cover it, cut the centre), pad (fit inside, "
                   "black borders) or squish (stretch each side)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="share of train/ held out when an image folder has no test/ (default 0.1)")
    p.add_argument("--label-mode", choices=["fine", "coarse"], default="fine",
                   help="CIFAR-100: 100 fine classes (default) or 20 coarse superclasses")
    p.add_argument("--class-names", type=_names, metavar="A,B,...", help="rename the classes, in label order")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out unreadable image files (listed in the run) instead of stopping with their list")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (which command's --help to read), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"cnnlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cnnlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("data", help="inspect a data set")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    _add_data_args(dsub.add_parser("info", help="format, classes, image size, counts per class and split"))

    p = sub.add_parser("summary", help="a Keras-style table of a model's layers and parameters")
    p.add_argument("--model", default="seed", help=MODEL_HELP + " (default seed)")
    _add_data_args(p)

    p = sub.add_parser("doctor", help="this machine: CPU, GPU, threads, precision, measured speed, expected times")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--seconds", type=_positive_float, default=1.0, help="time spent on each step measurement")

    p = sub.add_parser("presets", help="list the training presets")
    p.add_argument("--show", metavar="NAME", help="print one preset as a TOML file for `train --config`")
    sub.add_parser("models", help="list the registered models and the layer-spec grammar")

    _add_train_parser(sub)
    _add_lr_find_parser(sub)
    _add_result_parsers(sub)
    return parser


def _add_lr_find_parser(sub) -> None:
    p = sub.add_parser("lr-find", help="the learning-rate range test: loss against an exponentially growing rate, "
                       "a plot and a suggested --lr")
    _add_data_args(p)
    _add_recipe_args(p)
    p.add_argument("--start", type=_positive_float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=_positive_float, default=10.0, help="last learning rate (default 10)")
    p.add_argument("--steps", type=_positive_int, default=100, help="batches in the sweep (default 100)")
    p.add_argument("--out", default="lr_find.png", metavar="PNG", help="the plot (default lr_find.png)")
    p.set_defaults(dry_run=False, epochs=None)


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


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model, then evaluate it (flags override the preset)")
    _add_data_args(p)
    _add_recipe_args(p)
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--lr", type=_positive_float, help="learning rate; per 1024 examples under presets with "
                   "per_1024 (quick, fast: `cnnlab presets --show quick`), as airbench states it")
    p.add_argument("--augment", help="augmentation: none, seed, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--subset", type=_positive_int, metavar="N", help="train on a stratified subset of N images")
    p.add_argument("--val-split", type=_fraction, metavar="F",
                   help="validate on a seeded, stratified share F of the training images and keep the test set "
                   "for the end (default: validate on the test set, as the tutorial does)")
    p.add_argument("--init-from", metavar="RUN_DIR", help="start from a finished run's weights (fine-tuning); "
                   "a different class count gets a new classifier head")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 where the CPU or GPU computes it natively, else fp32")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (GPUs)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads, fixed (bit-exact repeatable); default: as many as other processes leave free")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<timestamp>-<preset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="STEPS",
                   help="also checkpoint every STEPS steps within an epoch (default: at epoch ends)")
    p.add_argument("--on-nan", choices=["stop", "skip-batch"],
                   help="on a non-finite loss: stop, keeping the last good checkpoint (default), or skip the batch")
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="data-parallel training in N processes on this machine (runs torchrun; the batch size "
                   "stays the global one)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several processes: BatchNorm statistics over the global batch")
    p.add_argument("--val-sample", type=_positive_int, metavar="N",
                   help="validate each epoch on a fixed stratified sample of N images (the last epoch: on all)")
    p.add_argument("--dry-run", action="store_true", help="smoke test: 1 epoch on 512 images")
    _add_knobs(p)
    _add_transfer_args(p)
    p.add_argument("--budget", type=_budget, metavar="TIME", help="e.g. 10m: pick the recipe and epochs that should "
                   "reach the best accuracy in that much training here (measured in a few seconds; CIFAR-sized data)")
    p.add_argument("--log", action="append", choices=["tensorboard", "mlflow"],
                   help="track the run in TensorBoard (RUN_DIR/tensorboard) and/or MLflow; repeat for both")
    p.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                   "a SQLite database beside the run: RUN_DIR/../mlflow.db); http:// servers work too")
    p.add_argument("--no-report", action="store_true",
                   help="no pictures at the end (report.html, confusion_matrix.png: matplotlib's 0.4 s); "
                   "`cnnlab report RUN` draws them later")


def _add_result_parsers(sub) -> None:
    """The commands that use a finished run: evaluate, export, serve, report, runs, predict."""
    p = sub.add_parser("evaluate", help="test loss, accuracy, per-class scores and confusion matrix of a run "
                       "(or of an exported .onnx model, through onnxruntime)")
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL.onnx")
    p.add_argument("--data", metavar="PATH", help="data to evaluate on (default: the run's own)")
    p.add_argument("--out", metavar="DIR", help="where the results of other --data go (default "
                   "RUN_DIR/evaluations/<data folder name>); the run's own results never change")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("export", help="export a run as one ONNX file: uint8 images in, probabilities out")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", metavar="FILE", help="where to write it (default RUN_DIR/model.onnx)")
    p.add_argument("--data", metavar="PATH", help="test images for the export check (default: the run's data)")

    p = sub.add_parser("serve", help="a web page and JSON API that classify uploaded images")
    p.add_argument("model", metavar="RUN_DIR|MODEL.onnx")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=_positive_int, default=1, help="server processes (default 1)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=10.0, help="per request (default 10)")
    p.add_argument("--max-files", type=_positive_int, default=64, help="images per request (default 64)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("report", help="write report.html: curves, confusion matrices, mistakes, config")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", metavar="PATH", help="data to evaluate on (default: the run's own)")
    p.add_argument("--out", metavar="FILE", help="where to write the report (default RUN_DIR/report.html)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("runs", help="list training runs; --compare overlays their validation accuracy")
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="folder of runs (default runs/)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="run directories to overlay in one PNG")
    p.add_argument("--out", metavar="FILE", default="compare.png", help="PNG for --compare (default compare.png)")

    p = sub.add_parser("predict", help="classify image files with a trained run or an exported .onnx model")
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders (searched at any depth)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes per image (default 5, as the server)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--csv", metavar="FILE",
                   help="write FILE: a header row `filename,class_1,probability_1,...,error`, then a row per image")
    p.add_argument("--device", default="auto")


def _data_config(args: argparse.Namespace, **extra) -> DataConfig:
    return DataConfig(path=args.data, image_size=args.image_size, val_fraction=args.val_fraction,
                      label_mode=args.label_mode, class_names=args.class_names,
                      skip_bad_images=args.skip_bad_images, resize=args.resize, **extra)


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
    from cnnlab import dist

    if args.resume:
        _check_resume_flags(args)
    if args.budget:
        _check_budget_flags(args)
    from cnnlab.training.preflight import check_names

    cfg = check_names(_train_config(args))  # before starting processes: one message, not one per process
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if cfg.pretrained == "imagenet":  # one download here, not one per process
            from cnnlab.models import pretrained

            pretrained.fetch(cfg.model)
        return dist.launch(args.nproc, _without_nproc(argv))
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

    if os.environ.get("RANK", "0") == "0":
        print(f"cnnlab: error: {e}", file=sys.stderr, flush=True)
        e.said = True
    try:
        dist.close(together=True)  # the others wait here until it has
    except Exception:  # a process group that failed: leave it as any other failure does
        dist.close()


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The recipe, as `train` and `lr-find` both take it: a preset, a settings file, and the flags that
    change what is built (the rest of training's settings are `train`'s own)."""
    p.add_argument("--preset", default="seed", help=f"one of: {', '.join(presets.PRESETS)} (default seed); "
                   "see `cnnlab presets`")
    p.add_argument("--config", metavar="FILE.toml", help="training settings from a TOML file (`cnnlab presets --show "
                   "NAME` prints one); flags override the file, the file overrides the preset")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd", "muon"])
    p.add_argument("--pretrained", metavar="imagenet|PATH", help="start from torchvision's ImageNet weights of "
                   "--model (downloaded once into the torch hub cache) or a .pth/.pt/.safetensors file; the "
                   "ImageNet normalization and input size come with `imagenet` (`cnnlab models` lists which take it)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")


def _add_transfer_args(p: argparse.ArgumentParser) -> None:
    """Fine-tuning as fastai does it, and linear probes."""
    p.add_argument("--freeze-epochs", type=int, metavar="N", help="train the new head alone on the frozen body "
                   "(BatchNorm statistics too) for the first N epochs, then everything (--preset finetune: 1)")
    p.add_argument("--lr-spread", type=_positive_float, metavar="X", help="discriminative learning rates: the first "
                   "layers learn at lr/X, the head at lr (--preset finetune: 100, as fastai's slice(lr/100, lr))")
    p.add_argument("--head-only", action="store_true", default=None, help="a linear probe: embed every image once "
                   "with the frozen body (cached beside the decoded data), then train the head on the embeddings")
    p.add_argument("--normalize", choices=["unit", "meanstd", "imagenet"], help="input scaling: pixels/255, the "
                   "training images' per-channel statistics, or ImageNet's (which pretrained weights expect)")


def _add_knobs(p: argparse.ArgumentParser) -> None:
    """What practitioners set from the command line in Keras callbacks, fastai or timm: the optimizer's knobs,
    which epoch's weights to keep, when to stop."""
    p.add_argument("--schedule", choices=["constant", "triangle", "one-cycle", "cosine", "step", "plateau"],
                   help="learning rate over the steps (see `cnnlab presets --show NAME` for a preset's)")
    p.add_argument("--warmup", type=_below_one, metavar="F", help="warm-up as a fraction of all steps")
    p.add_argument("--weight-decay", type=_non_negative_float, metavar="X",
                   help="decoupled weight decay (per 1024 examples in presets that say so: quick, fast)")
    p.add_argument("--momentum", type=_below_one, metavar="X", help="SGD momentum")
    p.add_argument("--label-smoothing", type=_below_one, metavar="X")
    p.add_argument("--tta", type=int, choices=[0, 1, 2], help="test-time augmentation: 0 none, 1 mirror, "
                   "2 mirror and 1-pixel shifts")
    p.add_argument("--ema", type=_below_one, metavar="DECAY", help="train on, but validate and keep, an "
                   "exponential moving average of the weights (e.g. 0.999)")
    p.add_argument("--clip-grad", type=_non_negative_float, metavar="NORM", help="clip the gradients' global norm")
    p.add_argument("--accumulate", type=_positive_int, metavar="N",
                   help="compute each batch in N slices, adding up the gradients: the same step, 1/N the memory")
    p.add_argument("--class-weights", choices=["none", "auto"],
                   help="auto: weight each class's loss by how rare it is (imbalanced data)")
    p.add_argument("--monitor", choices=["val_loss", "val_acc"],
                   help="what the best epoch is (default val_loss); its weights are kept as best.safetensors")
    p.add_argument("--early-stopping", type=_positive_int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better --monitor, keeping the best epoch's weights")
    p.add_argument("--keep", choices=["auto", "last", "best"],
                   help="the weights model.safetensors gets: auto (default: the best epoch's when validating on "
                   "held-out images or stopping early, else the last), last (the seed preset, as Keras), best")


RESUME_TAKES = {"command", "resume", "data", "no_report", "nproc", "epochs"}  # the rest is the run's own


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


BUDGET_CHOOSES = ("preset", "epochs", "model", "config", "resume", "nproc")


def _check_budget_flags(args: argparse.Namespace) -> None:
    """--budget picks the recipe and its epochs itself (and plans one process)."""
    if flags := _given(args, BUDGET_CHOOSES):
        raise CnnlabError(f"--budget chooses the recipe and its epochs for this machine, so {flags} cannot go with it")


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
        training.resume(args.resume, args.data, with_report=not args.no_report, epochs=args.epochs)
        return
    subset = (args.subset or 512) if args.dry_run else args.subset
    if args.budget:
        from cnnlab import budget

        budget.train_within(args.budget, _data_config(args, subset=subset, val_split=args.val_split), out=args.out,
                            with_report=not args.no_report, tracking=tuple(args.log or ()),
                            device=args.device or "auto", seed=args.seed or 0)
        return
    training.train(cfg, _data_config(args, subset=subset, val_split=args.val_split), preset=args.preset,
                   out=args.out, with_report=not args.no_report, tracking=tuple(args.log or ()),
                   mlflow_uri=args.mlflow_uri)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
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

    if deploy.is_onnx(args.run_dir):
        print(evaluate.format_metrics(pytorch.evaluate_onnx(args.run_dir, args.data)))
        return
    print(evaluate.format_metrics(evaluate.evaluate_run(args.run_dir, args.data, device=args.device, out=args.out)))
    print(f"\nwrote metrics.json and confusion_matrix.csv/.json/.png in "
          f"{evaluate.results_folder(args.run_dir, args.data, args.out)}")


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnlab import deploy

    results = deploy.predict_files(args.run_dir, args.images, args.top_k, args.device)
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
                print(f"{r['filename']}: {shown}")
    else:
        print(f"wrote {len(results)} predictions to {args.csv}")
    bad = [r for r in results if "error" in r]
    if bad:
        print(f"cnnlab: error: {len(bad)} of {len(results)} file(s) could not be read (the rest were classified): "
              + "; ".join(r["error"] for r in bad[:10]) + ("; ..." if len(bad) > 10 else ""), file=sys.stderr)
        return 2
    return 0


def _write_predictions_csv(path: str, results: list[dict], k: int) -> None:
    import csv
    import io

    from cnnlab import files

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", *(f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "probability")),
                     "error"])
    for r in results:
        cells = [c for p in r.get("predictions", []) for c in (p["class"], f"{p['probability']:.6f}")]
        writer.writerow([r["filename"], *cells, *[""] * (2 * k - len(cells)), r.get("error", "")])
    files.write_text(path, buf.getvalue())


def cmd_serve(args: argparse.Namespace) -> None:
    from cnnlab.deploy import serve

    if not 0 <= args.port <= 65535:
        raise CnnlabError(f"--port must be between 0 and 65535, got {args.port}")
    serve.serve(serve.ServeConfig(model=args.model, host=args.host, port=args.port, workers=args.workers,
                                  max_upload_mb=args.max_upload_mb, max_files=args.max_files, device=args.device))


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int | None:
    """Carry out one parsed command; returns its exit code where it is not 0."""
    if args.command == "data":
        from cnnlab.data import cache  # no PyTorch: cached data is described from its meta.json

        print(cache.describe(cache.entry_for(_data_config(args).validate()).meta))
    elif args.command == "summary":
        cmd_summary(args)
    elif args.command == "doctor":
        from cnnlab import doctor

        info = doctor.report(args.seconds)
        print(json.dumps(info, indent=2) if args.json else doctor.format_report(info))
    elif args.command == "presets" and args.show:
        print(to_toml(presets.get(args.show), f"cnnlab preset {args.show!r}: edit, then `cnnlab train --config FILE`; "
                      "flags override the file, the file overrides the preset"), end="")
    elif args.command == "presets":
        for name, cfg in presets.PRESETS.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    elif args.command == "models":
        print(list_models())
    elif args.command == "lr-find":
        cmd_lr_find(args)
    elif args.command == "train":
        return cmd_train(args, sys.argv[1:] if argv is None else argv)
    elif args.command == "evaluate":
        cmd_evaluate(args)
    elif args.command == "export":
        from cnnlab.deploy import export

        result = export.export_onnx(args.run_dir, args.out, args.data)
        print(f"wrote {result['path']} in {result['seconds']} s; onnxruntime matches PyTorch on "
              f"{result['checked_images']} test images (largest probability difference {result['max_abs_diff']:.1e})")
    elif args.command == "serve":
        cmd_serve(args)
    elif args.command == "report":
        from cnnlab.evaluation import report
        from cnnlab.evaluation.analysis import Interpretation

        interp = Interpretation.from_run(args.run_dir, args.data, device=args.device)
        print(f"wrote {report.write_report(args.run_dir, interp, args.out)}")
    elif args.command == "runs":
        cmd_runs(args)
    elif args.command == "predict":
        return cmd_predict(args)


def _lost_contact(e: Exception) -> bool:
    if "torch" not in sys.modules:
        return False
    from cnnlab import dist

    return dist.lost_contact(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    where = f"(process {rank}) " if rank not in ("0", "") else ""  # under torchrun each process speaks for itself
    try:
        code = run(args, argv)
    except CnnlabError as e:
        if not (where and isinstance(e, EveryProcessError)) and not getattr(e, "said", False):  # process 0 says it
            # for all of them
            print(f"cnnlab: error: {where}{e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if not where:  # the other processes stopped at the same step: process 0 speaks for all
            print(f"cnnlab: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cnnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # the reader of our output left (`| head`): `entry` ends quietly
    except OSError as e:
        if e.filename is None:
            return _internal_error(e, where)
        print(f"cnnlab: error: {where}cannot use {e.filename}: {e.strerror or e}", file=sys.stderr)  # a mode-000
        return 2  # folder, a read-only disk, a path that vanished while we read: the user's to fix, not a bug
    except Exception as e:
        return _internal_error(e, where)
    return code or 0


def _internal_error(e: Exception, where: str) -> int:
    """A bug: one line for users, the traceback on request."""
    if os.environ.get("CNNLAB_DEBUG"):
        raise e
    if _lost_contact(e):  # another process failed first and says why; this one stays quiet, and waits
        time.sleep(3)  # so that the launcher sees that process end first and reports its exit code
        return 75
    print(f"cnnlab: internal error: {where}{type(e).__name__}: {e} (set CNNLAB_DEBUG=1 for the traceback)",
          file=sys.stderr)
    return 1


def entry() -> None:
    """The `cnnlab` command: `main`, then leave without the interpreter's teardown.

    Every result is written (atomically, synced) and both streams are flushed before this exits; what is
    skipped is the finalization of PyTorch's and every other module's objects, 0.66 s after a `quick` run
    (measured). `main` itself returns normally, for callers in Python.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `cnnlab runs | head -1`: the reader has what it wanted; end quietly, as Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # do (SIGPIPE's status, 128 + 13)
        code = 141
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
