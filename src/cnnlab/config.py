"""One dataclass per concern. Presets (presets.py) fill them in; command-line flags override fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class DataConfig:
    path: str | None = None  # None: $CNNLAB_DATA, ~/.cache/cnnlab, ~/.keras/datasets, then download
    val_fraction: float = 0.1  # held out of train/ only when an image folder has no test/
    split_seed: int = 0  # the held-out split must not move between runs, whatever the training seed
    image_size: tuple[int, int] | None = None  # None: the size of the first training image
    subset: int | None = None  # train on a seeded, stratified subset of this many images
    val_split: float | None = None  # hold out this share of train for validation; None: validate on test
    label_mode: str = "fine"  # CIFAR-100: fine (100 classes) or coarse (20 superclasses)
    class_names: tuple[str, ...] | None = None  # rename the classes in order (IDX files carry no names)
    skip_bad_images: bool = False  # image folders: skip unreadable files (recorded in the run) instead of failing


@dataclass
class TrainConfig:
    model: str = "seed"  # a registered name (cnnlab models) or a layer spec such as c32-p-c64-p-f-d128
    init_from: str | None = None  # a finished run whose weights start this one (fine-tuning)
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"  # adam | sgd | muon (sgd, but conv filters take orthogonalized steps)
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
    schedule: str = "constant"  # constant | triangle (lr_start -> 1 at `warmup` of all steps -> lr_end)
    warmup: float = 0.0  # triangle: where the peak is, as a fraction of all steps
    lr_start: float = 0.0  # triangle: first step's learning rate, as a fraction of the peak
    lr_end: float = 0.0  # triangle: last step's learning rate, as a fraction of the peak
    label_smoothing: float = 0.0
    augment: str = "none"  # a name from cnnlab.augment.AUGMENTS
    normalize: str = "unit"  # unit: pixels / 255 as the tutorial does; meanstd: per-channel standardization
    lookahead: bool = False  # average the weights every 5 steps with a decay that rises to the end
    whiten_bias_epochs: int | None = None  # airbench nets: stop training the whitening bias after this
    tta: int = 0  # test-time augmentation: 0 none, 1 mirror, 2 mirror + 1-pixel translations
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model: pays off on GPUs; on this CPU it was slower
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)
    eval_batch_size: int = 1000  # evaluation has no gradients, so large batches are cheap
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0: at epoch ends only)
    on_nan: str = "stop"  # a non-finite loss: stop (keep the last good checkpoint) | skip-batch


def override(cfg, **changes):
    """A copy of dataclass `cfg` with the non-None `changes` applied (unknown names are an error)."""
    names = {f.name for f in fields(cfg)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown config fields: {sorted(unknown)}")
    return type(cfg)(**{**asdict(cfg), **{k: v for k, v in changes.items() if v is not None}})


def from_dict(cls, d: dict):
    """Rebuild a config from its JSON form (lists back to tuples), ignoring fields it does not know."""
    names = {f.name: f for f in fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return cls(**kwargs)
