"""One dataclass per concern. Presets (presets.py) fill them in; command-line flags override fields.

Fields that take one of a fixed set of values are `Literal` types, and `TrainConfig.validate()` checks
every value in one place. Names that live in a registry (the model, the augmentation, the pretrained
weights) are checked by the preflight (training/preflight.py), which `train()` runs before it reads any
data or creates the run directory, so a typo costs nothing and leaves nothing behind.

This module is part of the base layer: it imports nothing of the project but its error type, so every
layer may read a configuration.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

from cnnlab.errors import CnnlabError

Optimizer = Literal["adam", "adamw", "sgd", "muon"]
Schedule = Literal["constant", "triangle", "one-cycle", "cosine", "step", "plateau"]
Normalize = Literal["unit", "meanstd", "imagenet"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
OnNan = Literal["stop", "skip-batch"]
Monitor = Literal["val_loss", "val_acc"]
Keep = Literal["auto", "last", "best"]
ClassWeights = Literal["none", "auto"]
LabelMode = Literal["fine", "coarse"]
Resize = Literal["crop", "pad", "squish"]  # images.py: how an image file reaches the input size


MAX_THREADS = 1024  # OpenMP crashed (segfault) at --threads 100000; no CPU socket has more than 1,024 threads
MAX_IMAGE_SIDE = 4096  # 16.7 megapixels, the decoder's own limit: larger inputs are typos, not photos


@dataclass
class DataConfig:
    path: str | None = None  # None: $CNNLAB_DATA, ~/.cache/cnnlab, ~/.keras/datasets, then download
    val_fraction: float = 0.1  # held out of train/ only when an image folder has no test/
    split_seed: int = 0  # the held-out split must not move between runs, whatever the training seed
    image_size: tuple[int, int] | None = None  # None: small images (<= 64 px) keep theirs, larger ones become 96x96
    resize: Resize = "crop"  # fastai's default: no distortion; training crops at random, evaluation the centre
    subset: int | None = None  # train on a seeded, stratified subset of this many images
    val_split: float | None = None  # hold out this share of train for validation; None: validate on test
    label_mode: LabelMode = "fine"  # CIFAR-100: fine (100 classes) or coarse (20 superclasses)
    class_names: tuple[str, ...] | None = None  # rename the classes in order (IDX files carry no names)
    skip_bad_images: bool = False  # image folders: skip unreadable files (recorded in the run) instead of failing

    def validate(self) -> DataConfig:
        check_literals(self)
        _require(0 < self.val_fraction < 1, f"val-fraction must be between 0 and 1, got {self.val_fraction}")
        _require(self.val_split is None or 0 < self.val_split < 1,
                 f"val-split must be between 0 and 1, got {self.val_split}")
        _require(self.subset is None or self.subset >= 1, f"subset must be at least 1, got {self.subset}")
        _require(self.path is None or self.path.strip() != "", "--data is empty: give a folder, archive or CSV "
                 "(`--data .` for the current folder)")
        dup = sorted({n for n in self.class_names or () if list(self.class_names).count(n) > 1})
        _require(not dup, f"class-names repeats {', '.join(dup)}: each class needs its own name")
        _require(self.image_size is None or (min(self.image_size) >= 1 and max(self.image_size) <= MAX_IMAGE_SIDE),
                 f"image size must be 1 to {MAX_IMAGE_SIDE} px per side, got {self.image_size}")
        return self


@dataclass
class TrainConfig:
    model: str = "seed"  # a registered name (cnnlab models) or a layer spec such as c32-p-c64-p-f-d128
    init_from: str | None = None  # a finished run whose weights start this one (fine-tuning)
    pretrained: str | None = None  # "imagenet" (torchvision's weights of the network) or a .pth/.safetensors file
    freeze_epochs: int = 0  # the first epochs train the head alone on the frozen body (BatchNorm statistics too);
    # then everything trains. `epochs` counts both phases; each phase runs its own cycle of the schedule
    head_only: bool = False  # a linear probe: embed every image once (cached), then train the head on the embeddings
    lr_spread: float = 1.0  # discriminative rates: the earliest layers learn at lr / lr_spread, the head at lr
    # (fastai's slice(lr / 100, lr) is 100; 1: one rate for all)
    epochs: int = 15
    batch_size: int = 64
    optimizer: Optimizer = "adam"  # adam | adamw (decoupled decay) | sgd | muon (sgd, but conv filters orthogonalized)
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's moment decays
    eps: float = 1e-7  # Keras' Adam epsilon; PyTorch's default is 1e-8
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    filter_lr: float = 0.24  # muon: conv filters' step as an angle (fixed norm); per step, not per 1024
    filter_momentum: float = 0.6  # muon: the filters' momentum; orthogonalizing already smooths the step
    weight_decay: float = 0.0
    per_1024: bool = False  # lr and weight_decay are per 1024 examples (airbench's convention, SGD only)
    bias_lr_scale: float = 1.0  # BatchNorm shifts learn this many times faster (and decay as much slower)
    # constant | triangle (linear lr_start -> 1 at `warmup` -> lr_end: airbench's) | one-cycle (the same shape
    # with cosine ramps: fastai's fit_one_cycle) | cosine (linear warm-up, then cosine down to lr_end) | step
    # (warm-up, then x0.1 at 50% and 75% of the steps) | plateau (warm-up, then x0.1 whenever `monitor` has
    # not improved for 2 epochs: Keras' ReduceLROnPlateau)
    schedule: Schedule = "constant"
    warmup: float = 0.0  # the warm-up (or the triangle's rise), as a fraction of all steps
    lr_start: float = 0.0  # triangle, one-cycle: first step's learning rate, as a fraction of the peak
    lr_end: float = 0.0  # triangle, one-cycle, cosine: last step's learning rate, as a fraction of the peak
    label_smoothing: float = 0.0
    augment: str = "none"  # a name from cnnlab.augment.AUGMENTS
    normalize: Normalize = "unit"  # unit: pixels / 255 as the tutorial does; meanstd: per-channel standardization
    # from the training images; imagenet: ImageNet's statistics, which pretrained weights expect
    lookahead: bool = False  # average the weights every 5 steps with a decay that rises to the end
    whiten_bias_epochs: int | None = None  # airbench nets: stop training the whitening bias after this
    tta: int = 0  # test-time augmentation: 0 none, 1 mirror, 2 mirror + 1-pixel translations
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = "auto"  # auto (bf16 where the hardware has it, else fp32) | fp32 | bf16 | fp16
    threads: int = 0  # CPU threads: 0 follows the machine's load (threads.py); N fixes N (bit-exact repeatable)
    compile: bool = False  # torch.compile the model: pays off on GPUs; on this CPU it was slower
    stream: bool = False  # gather each batch from the host copy ahead of the step, even where the images fit
    # on the GPU (data.loader: they stream anyway where they do not); the same batches, bit for bit
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)
    eval_batch_size: int = 1000  # evaluation has no gradients, so large batches are cheap
    val_sample: int = 0  # validate each epoch on a fixed stratified sample of this many images (0: all of
    # them); the last epoch always validates on all, so the final metrics never come from a sample
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    on_nan: OnNan = "stop"  # a non-finite loss: stop (keep the last good checkpoint) | skip-batch
    monitor: Monitor = "val_loss"  # what the best epoch is: lowest validation loss | highest val_acc (Keras')
    early_stopping: int = 0  # stop after this many epochs without a better `monitor` (0: train every epoch)
    # which weights model.safetensors gets: the last epoch's | the best epoch's (best.safetensors) | auto: the
    # best when validating on held-out images (--val-split, a val/ folder) or stopping early, else the last
    # (when the validation set is the test set, picking by it would flatter the test score)
    keep: Keep = "auto"
    ema: float = 0.0  # an exponential moving average of the weights, this decay a step (0: off; timm uses
    # 0.9998 over long runs): validation, the best epoch and the saved model use the average
    clip_grad: float = 0.0  # clip the gradients' global norm to this (0: off)
    accumulate: int = 1  # compute each step's batch in this many slices, adding up their gradients: the same
    # update for 1/N of the activation memory (BatchNorm sees the slices)
    class_weights: ClassWeights = "none"  # auto: each class's loss weighted by N / (classes x its count)

    def validate(self) -> TrainConfig:
        """Every field checked at once; raises CnnlabError naming the first bad one. Returns self."""
        try:
            return self._validate()
        except TypeError:  # a field of the wrong type (a hand-edited config.json): compared with a number
            raise CnnlabError(f"a training setting has the wrong type: {asdict(self)}") from None

    def _validate(self) -> TrainConfig:
        check_literals(self)
        for f in fields(self):
            value = getattr(self, f.name)
            _require(not isinstance(value, float) or math.isfinite(value),
                     f"{f.name.replace('_', '-')} must be a finite number, got {value}")
        for names, test, what in ((("epochs", "batch_size", "eval_batch_size"), lambda v: v >= 1, "at least 1"),
                                  (("lr", "eps", "filter_lr"), lambda v: v > 0, "above 0"),
                                  (("weight_decay", "checkpoint_every", "threads", "val_sample", "label_smoothing",
                                    "warmup", "lr_start", "lr_end", "early_stopping", "freeze_epochs"),
                                   lambda v: v >= 0,
                                   "0 or more")):
            for name in names:
                value = getattr(self, name)
                _require(test(value), f"{name.replace('_', '-')} must be {what}, got {value}")
        _require(self.threads <= MAX_THREADS, f"threads must be at most {MAX_THREADS}, got {self.threads}")
        _require(self.label_smoothing < 1, f"label-smoothing must be below 1, got {self.label_smoothing}")
        _require(self.warmup <= 1, f"warmup is a fraction of all steps (0 to 1), got {self.warmup}")
        _require(0 <= self.momentum < 1 and 0 <= self.filter_momentum < 1, "momentum must be in [0, 1)")
        _require(self.tta in (0, 1, 2), f"tta must be 0, 1 or 2, got {self.tta}")
        _require(0 <= self.ema < 1, f"ema is a decay per step, from 0 (off) to below 1, got {self.ema}")
        _require(self.clip_grad >= 0, f"clip-grad must be 0 (off) or more, got {self.clip_grad}")
        _require(self.accumulate >= 1 and self.batch_size % self.accumulate == 0,
                 f"accumulate must divide the batch size ({self.batch_size}) into equal slices, got {self.accumulate}")
        _require(0 <= self.seed < 2**32, f"seed must be from 0 to {2**32 - 1}, got {self.seed}")
        _require(self.whiten_bias_epochs is None or self.whiten_bias_epochs >= 0, "whiten-bias-epochs must be >= 0")
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None,
                 f"unknown device {self.device!r}; use auto, cpu, cuda or cuda:N")
        _require(not (self.per_1024 and self.optimizer in ("adam", "adamw")),
                 "per-1024 learning rates are for sgd and muon")
        self._validate_transfer()
        return self

    def _validate_transfer(self) -> None:
        _require(self.lr_spread >= 1, f"lr-spread is the head's rate over the first layers', at least 1, "
                 f"got {self.lr_spread}")
        _require(self.freeze_epochs < self.epochs or self.head_only,
                 f"freeze-epochs ({self.freeze_epochs}) must leave some of the {self.epochs} epochs to train "
                 "everything")
        _require(not ((self.head_only or self.freeze_epochs) and not (self.pretrained or self.init_from)),
                 "a frozen body needs trained weights: add --pretrained imagenet|PATH or --init-from RUN")
        _require(not (self.pretrained and self.init_from), "give --pretrained or --init-from, not both")
        _require(not (self.head_only and self.optimizer == "muon"), "--head-only trains one linear layer: use "
                 "adam, adamw or sgd")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CnnlabError(message)


def check_literals(cfg) -> None:
    """Each `Literal`-typed field of dataclass `cfg` holds one of its allowed values."""
    for name, hint in get_type_hints(type(cfg)).items():
        allowed = get_args(hint) if getattr(hint, "__origin__", None) is Literal else ()
        if allowed and getattr(cfg, name) not in allowed:
            raise CnnlabError(f"unknown {name.replace('_', '-')} {getattr(cfg, name)!r}; use one of: "
                              + ", ".join(allowed))


def override(cfg, **changes):
    """A copy of dataclass `cfg` with the non-None `changes` applied (unknown names are an error)."""
    names = {f.name for f in fields(cfg)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown config fields: {sorted(unknown)}")
    return type(cfg)(**{**asdict(cfg), **{k: v for k, v in changes.items() if v is not None}})


def from_dict(cls, d: dict):
    """Rebuild a config from its JSON form (lists back to tuples), ignoring fields it does not know; a value
    of the wrong type (a damaged or hand-edited config.json) is a CnnlabError naming the field."""
    if not isinstance(d, dict):
        raise CnnlabError(f"expected the fields of {cls.__name__} as a JSON object, got {type(d).__name__}")
    hints = get_type_hints(cls)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in hints}
    for name, value in kwargs.items():
        if not _fits(value, hints[name]):
            raise CnnlabError(f"{name} = {value!r} is not a valid {cls.__name__} value; the file was damaged or edited")
    return cls(**kwargs)


def _fits(value, hint) -> bool:
    """Whether a JSON value (lists already tuples) has the type a config field is annotated with."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (Union, UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


# ---------------------------------------------------------------------------------------------------
# Training settings as a TOML file: `cnnlab train --config FILE.toml`, `cnnlab presets --show NAME`


def to_toml(cfg: TrainConfig, title: str = "") -> str:
    """A TrainConfig as a TOML file `from_toml` reads back (unset optional fields as comments)."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, tuple | list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)
    lines = [f"# {title}"] if title else []
    for name, v in asdict(cfg).items():
        per_1024 = "  # per 1024 examples (per_1024 = true)" if name in ("lr", "weight_decay") and cfg.per_1024 else ""
        lines.append(f"# {name}: not set" if v is None else f"{name} = {value(v)}{per_1024}")
    return "\n".join(lines) + "\n"
