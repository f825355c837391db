"""The command line's arguments: one argparse parser per subcommand, and the types that check each value
(a bad value is one line naming the flag, before anything runs)."""

from __future__ import annotations

import argparse
import math

from cnnlab import __version__, presets
from cnnlab.config import MAX_IMAGE_SIDE
from cnnlab.errors import CnnlabError

DESCRIPTION = """The `cnnlab` command: a thin layer over the Python API (each subcommand calls one function).

Modules are imported by the subcommand that needs them: `cnnlab predict model.onnx` and
`cnnlab serve model.onnx` run on onnxruntime and never import PyTorch.
"""
MODEL_HELP = "a name from `cnnlab models` or a layer spec such as c32-p-c64-p-f-d128"


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of class names")
    return names


def _fraction(text: str) -> float:
    """A share: above 0, below 1."""
    return _unit(text, zero=False)


def _min_confidence(text: str) -> float | str:
    """A probability from 0 to 1, or `auto`."""
    if text == "auto":
        return text
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, or auto; got {text}")
    return value


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


def _int_between(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value
    return parse


def _endpoint(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (a port from 1 to 65535)")
    return text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {value}")
    return value


def _add_runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino"],
                   help="what runs an .onnx model (default auto: onnxruntime; for `serve`, OpenVINO where it is "
                   "installed and measured faster on this CPU class; an OpenVINO model always runs in OpenVINO)")


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


def _add_check_args(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    p.add_argument("--json", metavar="FILE", help="write every finding (leaks, duplicates, conflicts, unreadable, ...)")
    p.add_argument("--html", metavar="FILE", help="write a page with thumbnails of every finding")
    p.add_argument("--strict", action="store_true", help="exit 1 when there are leaks or conflicts")
    p.add_argument("--near", type=_int_between(0, 32), default=6, metavar="BITS",
                   help="near copies: perceptual hashes at most this many bits of 64 apart (default 6)")
    p.add_argument("--labels", action="store_true", help="also rank likely label errors: trains --folds quick "
                   "models out of fold (minutes) and ranks the images by confident learning (cleanlab)")
    p.add_argument("--folds", type=_int_between(2, 20), default=5, help="models for --labels (default 5)")
    p.add_argument("--seed", type=int, default=0, help="the folds' split and the models' seed (default 0)")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (which command's --help to read), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"cnnlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cnnlab", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("data", help="inspect a data set")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND", parser_class=Parser)
    _add_data_args(dsub.add_parser("info", help="format, classes, image size, counts per class and split"))
    _add_check_args(dsub.add_parser("check", help="duplicates, train/test leaks, label conflicts, odd files; "
                                    "--labels: likely label errors"))

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
    p.add_argument("--stream", action="store_true", default=None,
                   help="stream batches from the host to the GPU a few steps ahead, even where the images fit on it "
                        "(they stream anyway where they do not); the same result")
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
    p.add_argument("--nnodes", type=_positive_int, metavar="N",
                   help="with --rdzv-endpoint: N machines train together, each running this same command "
                   "(torchrun's c10d rendezvous; --nproc processes on each)")
    p.add_argument("--node-rank", type=_int_between(0, 100_000), metavar="R",
                   help="this machine's number, 0 to N-1 (said in the log; torchrun's c10d rendezvous orders "
                   "machines by host name)")
    p.add_argument("--rdzv-endpoint", type=_endpoint, metavar="HOST:PORT",
                   help="where the machines meet: a host all of them reach and a free port on it")
    p.add_argument("--max-restarts", type=_int_between(0, 1000), metavar="N",
                   help="when a process dies, restart the group up to N times; every process resumes from the "
                   "run's last checkpoint")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="with several processes: BatchNorm statistics over the global batch")
    p.add_argument("--val-sample", type=_positive_int, metavar="N",
                   help="validate each epoch on a fixed stratified sample of N images (the last epoch: on all)")
    p.add_argument("--dry-run", action="store_true", help="smoke test: 1 epoch on 512 images")
    _add_knobs(p)
    _add_transfer_args(p)
    p.add_argument("--budget", type=_budget, metavar="TIME", help="e.g. 10m: search the recipes that suit the data "
                   "(trials on a held-out split) and train the best, all within that time here")
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
                       "(or of an exported model: .onnx, or an OpenVINO folder or .xml)")
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL")
    p.add_argument("--data", metavar="PATH", help="data to evaluate on (default: the run's own)")
    p.add_argument("--out", metavar="DIR", help="where the results of other --data go (default "
                   "RUN_DIR/evaluations/<data folder name>); the run's own results never change")
    p.add_argument("--device", default="auto")
    _add_runtime_arg(p)

    p = sub.add_parser("export", help="export a run as one ONNX file or OpenVINO model (fp32 or int8): uint8 images "
                       "in, probabilities out; checked before it is written")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", choices=["onnx", "openvino"],
                   help="onnx (default), or openvino: a folder with OpenVINO's model.xml and model.bin "
                   "(pip install 'cnnlab[openvino]')")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (ranges from 300 seeded training images); "
                   "refused, and nothing written, if it loses more than --max-drop points of test accuracy")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="test accuracy an int8 model may lose against fp32, in points (default 1; below 0: it must "
                   "gain that much)")
    p.add_argument("--calibration-images", type=_positive_int, default=300, metavar="N",
                   help="training images the int8 ranges are measured on (default 300)")
    p.add_argument("--out", metavar="PATH", help="where to write it (default RUN_DIR/model.onnx, model.int8.onnx, "
                   "openvino/ or openvino-int8/)")
    p.add_argument("--data", metavar="PATH", help="test images for the export's checks (default: the run's data)")

    p = sub.add_parser("serve", help="a web page and JSON API that classify uploaded images")
    p.add_argument("model", metavar="RUN_DIR|MODEL")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=_positive_int, default=1, help="server processes (default 1)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=10.0, help="per request (default 10)")
    p.add_argument("--max-files", type=_positive_int, default=64, help="images per request (default 64)")
    p.add_argument("--min-confidence", type=_min_confidence, metavar="P|auto",
                   help="answer `unknown` when the chance that the top class is right is below P (a request may "
                   "pass its own min_confidence); `auto`: the run's suggestion for 95%% accuracy")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="check the port and the model, say where it would serve, "
                   "and exit")
    _add_runtime_arg(p)

    p = sub.add_parser("report", help="write report.html: curves, confusion matrices, mistakes, config")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", metavar="PATH", help="data to evaluate on (default: the run's own)")
    p.add_argument("--out", metavar="FILE", help="where to write the report (default RUN_DIR/report.html)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("runs", help="list training runs; --compare overlays their validation accuracy")
    p.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="folder of runs (default runs/)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="run directories to overlay in one PNG")
    p.add_argument("--out", metavar="FILE", default="compare.png", help="PNG for --compare (default compare.png)")

    p = sub.add_parser("explain", help="Grad-CAM heatmaps: where the network looked in each image (a run directory)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("images", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders (searched at any depth)")
    p.add_argument("--out", metavar="DIR", help="where the overlays go (default RUN_DIR/explanations)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="the class to map (default: each image's predicted class)")
    p.add_argument("--layer", metavar="NAME", help="the layer to map (default: the last convolution whose output is "
                   "at least 2x2; names as in the model's state dict)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("predict", help="classify image files with a trained run or an exported model (.onnx, "
                       "OpenVINO)")
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL")
    p.add_argument("images", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders (searched at any depth)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes per image (default 5, as the server)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--csv", metavar="FILE",
                   help="write FILE: a header row `filename,label,confidence,` `class_1,probability_1,...,error`, "
                   "then a row per image")
    p.add_argument("--min-confidence", type=_min_confidence, metavar="P|auto",
                   help="answer `unknown` when the chance that the top class is right (from the run's calibration) "
                   "is below P (0-1); `auto`: the run's suggestion, where its held-out images reach 95%% accuracy")
    p.add_argument("--device", default="auto")
    _add_runtime_arg(p)


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
