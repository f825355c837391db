"""Named training recipes. Each is a TrainConfig; a comment on each field says why it has that value."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, fields, replace
from pathlib import Path

from cnnlab.config import TrainConfig, from_dict
from cnnlab.errors import CnnlabError

# The tutorial exactly: its network, Keras' Adam defaults, 15 epochs of batch 64, pixels / 255.
SEED = TrainConfig(
    model="seed",  # Conv32-Pool-Conv64-Pool-Dense128-Dense10, 545,098 parameters
    epochs=15,  # model.fit(..., epochs=15)
    batch_size=64,  # model.fit(..., batch_size=64)
    optimizer="adam",  # Adam() with Keras defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-7
    lr=1e-3,
    schedule="constant",  # Keras keeps the learning rate fixed unless told otherwise
    augment="none",  # the tutorial's first model trains on the raw images
    normalize="unit",  # X / 255.0
    keep="last",  # model.fit keeps the last epoch's weights (the log and report still name the best epoch)
)

# The tutorial's second model: the same, trained through its ImageDataGenerator.
SEED_AUG = replace(
    SEED,
    augment="seed",  # rotation ±20°, width/height shift ±20%, horizontal flip, nearest fill
)

# airbench94's method (Keller Jordan, 2024), written for this project: 94% on CIFAR-10 in 10 epochs.
FAST = TrainConfig(
    model="airbench94",  # whitening conv, conv groups 64/256/256 with BatchNorm and GELU
    epochs=12,  # 91.3% in 1,128 s on this host's slow hours, as SGD's 18 epochs (91.4%) reach in 1,610 s
    batch_size=1024,  # large batches keep both cores busy; lr and decay below are per 1024 examples
    optimizer="muon",  # conv filters take orthogonalized steps: at 5 epochs 89.38% against SGD's 88.26%
    filter_lr=0.12,  # an angle per step: 0.24 (airbench94_muon's, at batch 2000) gave 90.9% in 12 epochs
    filter_momentum=0.6,  # less momentum than the SGD part: orthogonalization already smooths the steps
    nesterov=True,  # looks ahead along the momentum: steadier at this high learning rate
    momentum=0.85,
    lr=11.5,  # per 1024 examples (see optim.make_optimizer): survives changes of batch size
    weight_decay=0.0153,  # per 1024 examples, decoupled from the learning rate schedule
    per_1024=True,
    bias_lr_scale=64.0,  # BatchNorm shifts need far larger steps than the conv weights to move at all
    schedule="triangle",  # linear warm-up from 0.2x to the peak at 23% of steps, then down to 0.07x
    warmup=0.23,
    lr_start=0.2,
    lr_end=0.07,
    label_smoothing=0.2,  # CIFAR labels are noisy at 32x32; soft targets generalize better
    augment="flip-translate",  # alternating flips + 2-px reflected shifts: no more is useful in 10 epochs
    normalize="meanstd",  # centred inputs suit the whitening layer and BatchNorm
    lookahead=True,  # weight averaging every 5 steps: a free ensemble along the trajectory
    whiten_bias_epochs=3,  # after that the whitening bias only adds noise
    tta=2,  # average over mirror and 1-px shifts at test time: about +0.5 points
)

# The least wall time to beat the tutorial's 68%: the fast recipe on a quarter-width network, briefly.
QUICK = replace(
    FAST,
    model="airbench-s",  # widths 16/32/128, 12-channel whitening: the full-resolution layers dominate the cost
    epochs=1,  # one pass already beats the tutorial's 15 epochs
    batch_size=256,  # 196 steps in the one epoch: measured 70.6% against 67.5% at batch 512, same time
    warmup=0.15,  # one epoch leaves no time for a long warm-up
    lr_start=0.5,  # measured 68.3% against 67.3% starting from 0.2
    filter_lr=0.24,  # twice fast's for a single epoch: 73.95% against 70.30% with SGD (seeds 0-2)
    whiten_bias_epochs=0,  # frozen whitening needs no backward through the 32x32 layers: 12.3 -> 10.4 s, -0.3 points
    tta=1,  # mirror only: 74.26% against level 2's 74.49% (seeds 0-2), for a third of the evaluation (1.5 s, not 4.4)
)

# The classic recipe of the ResNet papers, for the standard architectures listed by `cnnlab models`.
STANDARD = TrainConfig(
    model="resnet20",  # the smallest of them; pass --model for any other, or a layer spec
    epochs=30,  # a short form of the papers' 160-200 epochs: the single-cycle schedule below makes it count
    batch_size=128,  # the papers' batch size, which their learning rate goes with
    optimizer="sgd",
    nesterov=True,  # the same cost as plain momentum and a little steadier at lr 0.1
    momentum=0.9,
    lr=0.1,  # He et al. 2016 for batch 128
    weight_decay=5e-4,  # L2 as in the Wide ResNet paper; these nets overfit CIFAR-10 without it
    schedule="triangle",  # one cycle: warm up from 0.1x to the peak at 15% of steps, then down to 0
    warmup=0.15,
    lr_start=0.1,
    lr_end=0.0,
    label_smoothing=0.1,  # a mild version of airbench's 0.2: these networks are far larger
    augment="flip-translate",  # flips and 2-pixel shifts, applied to whole batches
    normalize="meanstd",  # per-channel standardization, as every one of these papers did
    tta=1,  # average each test image with its mirror image
)

# Your own photos, from scratch: 96 px inputs (cache.DEFAULT_IMAGE_SIZE) through a strided stem, trained by
# the same SGD recipe and triangle schedule as `standard`.
PHOTOS = replace(
    STANDARD,
    model="photonet",  # two stride-2 convolutions bring 96 px to 24 px; then airbench-shaped conv groups
    epochs=16,  # photo folders are often small: more passes, each seeing new random crops
    batch_size=64,  # more steps per epoch for the few thousand images a photo folder often has
    lr=0.05,  # the ResNet papers' 0.1 per 128 images, for batches of 64
    augment="flip-crop",  # random resized crops of the cached centre crop and alternating flips
    eval_batch_size=250,  # 250 images of 128x128 are 49 MB of floats per test-time view (96x96: 28 MB)
)

# Your own photos, starting from ImageNet: fastai's fine_tune (a frozen epoch, then everything, each phase a
# one-cycle) on torchvision's MobileNetV3-Large weights. A linear probe is the same with --head-only.
FINETUNE = TrainConfig(
    # 75.3% ImageNet top-1 against ResNet-18's 69.8%. At 224 px (benchmarks/transfer_speed.py) it trains 2.1x
    # as fast as ResNet-18 on an AVX2 CPU in fp32 (32 against 15 img/s) and embeds 3.6x as fast; on AVX-512
    # BF16 it trains at half ResNet-18's speed (28 against 56 img/s) and embeds faster (240 against 204)
    model="mobilenet_v3_large",
    pretrained="imagenet",  # torchvision's weights (pretrained.py); or a file: --pretrained PATH
    epochs=5,  # a few hundred photos per class: more passes only memorize them
    freeze_epochs=1,  # the new head first, on the frozen body: its random start must not scramble the body
    lr_spread=100,  # the first layers at lr/100, the last at lr/10, the head at lr: fastai's slice(lr/100, lr)
    batch_size=32,  # a few hundred photos give 10-30 steps an epoch; 224-px activations of 32 fit in memory easily
    optimizer="adamw",  # fastai's default, decoupled weight decay
    lr=2e-3,  # fastai's fine_tune base_lr
    weight_decay=0.01,  # fastai's default for AdamW
    schedule="one-cycle",  # per phase: cosine up from lr/25 for 25% of its steps, then down to nearly 0
    warmup=0.25,
    lr_start=0.04,
    lr_end=0.0,
    label_smoothing=0.1,  # a mild regularizer for small data
    augment="flip-crop",  # random resized crops and flips, the standard fine-tuning augmentation
    normalize="imagenet",  # what the weights were trained with
    tta=1,  # mirror averaging at test time
    eval_batch_size=32,  # at 224 px small batches keep activations in cache: embedding 204 img/s against 150 at
    # batch 100 (ResNet-18), 240 against 106 (MobileNetV3-L), bf16, 2-core Xeon
)

PRESETS: dict[str, TrainConfig] = {"seed": SEED, "seed-aug": SEED_AUG, "quick": QUICK, "fast": FAST,
                                   "standard": STANDARD, "photos": PHOTOS, "finetune": FINETUNE}


def get(name: str) -> TrainConfig:
    """The preset `name` (`cnnlab presets` lists them) as a TrainConfig; override fields with `config.override`."""
    if name not in PRESETS:
        raise CnnlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


MAX_CONFIG_BYTES = 1_000_000  # a settings file is a few hundred bytes; /dev/zero would be read until memory ends


def _read_small(path: Path) -> str:
    if path.exists() and not path.is_file():
        raise CnnlabError(f"config file {path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise CnnlabError(f"config file {path} is over {MAX_CONFIG_BYTES:,} bytes: not a settings file")
    return data.decode()


def from_toml(path: str, base: TrainConfig) -> TrainConfig:
    """`base` with the fields a TOML file sets (`preset = "NAME"` there picks the base instead)."""
    try:
        doc = tomllib.loads(_read_small(Path(path)))
    except FileNotFoundError:
        raise CnnlabError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CnnlabError(f"cannot read config file {path}: {e}") from None
    doc = {k.replace("-", "_"): v for k, v in doc.items()}
    if "preset" in doc:
        base = get(str(doc.pop("preset")))
    unknown = sorted(set(doc) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise CnnlabError(f"{path}: unknown setting(s) {', '.join(unknown)}; `cnnlab presets --show NAME` "
                          "prints every setting a file may hold")
    try:
        return from_dict(TrainConfig, {**asdict(base), **doc})
    except CnnlabError as e:
        raise CnnlabError(f"{path}: {e}") from None
