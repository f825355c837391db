"""What `--budget` may train, chosen from the data and the machine: each `Candidate` is a recipe (a preset,
perhaps a backbone and an input size) that the search then tunes.

    small images (<= 64 px)   quick, fast                                (CIFAR-sized recipes)
    photos                    photos at 64, 96 and 128 px (no larger than the images' median shorter side;
                              above its own 96 px only where the images carry detail there: `detail`)
                              finetune and a head-only probe of each backbone whose ImageNet weights are here
                              (the hub cache) or given (--pretrained FILE), at 128 px; and of the `finetune`
                              preset's own backbone when its weights can be downloaded (`download`)

A download happens before the search, outside the budget (budget.py); only the preset's backbone is fetched,
since every other one would cost its own download for one candidate among several. The log says which
weights were found. The hyperparameters a trial changes (`tuned`) act on any candidate alike: the learning
rate and weight decay as factors of the recipe's own, and the augmentation's strength in three steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cnnlab import presets
from cnnlab.config import TrainConfig
from cnnlab.data import images
from cnnlab.errors import CnnlabError
from cnnlab.models import pretrained

SMALL = 64  # images up to this side train with the CIFAR-sized recipes at their own size
PHOTO_SIZES = (64, 96, 128)  # photonet's input sizes tried from scratch (its 96 px default in the middle)
PHOTO_OWN = 96  # the photos recipe's own input size; a larger one costs 1.7x (128 px) and is a candidate only where
# the images have detail at it: at equal epochs (8) on 5,000 CIFAR images enlarged to 96-320 px, 96, 128 and 160
# px scored 58.9, 58.3 and 58.5% (benchmarks/results/photos_size.json), and at 15 minutes 128 px for 39-50 epochs
# 69.4-71.7% where 96 px for 69 and 90: 71.96 and 72.22%
DETAIL_MIN = 0.05  # the median share of an image's contrast a round trip through the next smaller size must lose
# (images.detail_lost) for the larger size to be a candidate: CIFAR enlarged to 96-320 px loses 0.021 at 128 px
# through 96 (90th percentile 0.028), scikit-image's 14 sample photos 0.151 (the lowest real one 0.056, a
# drawn colour wheel 0.008)
DETAIL_SAMPLE = 32  # training images read for it (0.12 s with the cache's file list, on the benchmark's 5,000 JPEGs)
BACKBONE_SIZE = 128  # ImageNet backbones' input size in a budget: 224 px costs 3x the time for a few points


@dataclass(frozen=True)
class Candidate:
    name: str  # as the leaderboard shows it, e.g. "photos@96" or "finetune:resnet18_imagenet@128"
    cfg: TrainConfig  # the recipe before tuning, its epochs set by the search
    image_size: tuple[int, int] | None  # None: the data's own size

    def tuned(self, lr_factor: float, weight_decay_factor: float, augment_strength: int) -> TrainConfig:
        """The recipe with a trial's hyperparameters."""
        cfg = self.cfg
        return replace(cfg, lr=cfg.lr * lr_factor, filter_lr=cfg.filter_lr * lr_factor,
                       weight_decay=cfg.weight_decay * weight_decay_factor,
                       augment=augment_at(cfg.augment, augment_strength))


def augment_at(augment: str, strength: int) -> str:
    """0: flips only; 1: the recipe's own; 2: the recipe's own and random erasing."""
    return ("flip", augment, f"{augment}+erasing")[strength] if augment != "none" else "none"


def for_data(image_size: tuple[int, int], pretrained_file: str | None = None, device: str = "auto",
             seed: int = 0, source_side: int | None = None, download: bool = False,
             require: tuple[str, ...] = (), detail: float | None = None) -> tuple[list[Candidate], list[str]]:
    """The candidates for images of `image_size` (as decoded; `source_side`: the files' median shorter side
    before resizing; `detail`: what they lose through PHOTO_OWN px at the next size above it, None if not
    measured), and a line for the log on what was found. `download`: also the `finetune` preset's
    backbone when its weights are not here but can be fetched; `require`: candidates another process chose,
    whose backbones are then candidates here whether their weights are on this machine yet or not."""
    def recipe(name: str, **changes) -> TrainConfig:
        return replace(presets.get(name), device=device, seed=seed, **changes)

    if max(image_size) <= SMALL:
        return [Candidate(name, recipe(name), None) for name in ("quick", "fast")], []
    side = source_side or min(image_size)
    sizes = [s for s in PHOTO_SIZES if s <= side] or [min(PHOTO_SIZES)]
    said = []
    if detail is not None and detail < DETAIL_MIN and max(sizes) > PHOTO_OWN:
        sizes = [s for s in sizes if s <= PHOTO_OWN]
        said.append(f"photos above {PHOTO_OWN} px left out: the images carry little detail beyond it (a round "
                    f"trip through {PHOTO_OWN} px changes {detail:.1%} of their contrast, detail {DETAIL_MIN:.0%})")
    found = [Candidate(f"photos@{s}", recipe("photos"), (s, s)) for s in sizes]
    required = {name.split(":")[1].rsplit("@", 1)[0] for name in require if ":" in name}
    cached = [m for m, w in pretrained.IMAGENET.items() if pretrained.cached_path(w).is_file()]
    said += [f"backbones with weights on this machine: {', '.join(cached) or 'none'} (the hub cache"
            + (", --pretrained" if pretrained_file else "") + ")"]
    backbones = {m: str(pretrained.cached_path(w)) for m, w in pretrained.IMAGENET.items()
                 if m in cached or m in required}
    default = presets.get("finetune").model
    if pretrained_file:
        backbones = {default: pretrained_file}
    elif download and default not in backbones:
        if pretrained.downloadable(default):
            backbones[default] = str(pretrained.cached_path(pretrained.IMAGENET[default]))
            said.append(f"{default}'s ImageNet weights can be downloaded: a candidate, fetched before the search")
        else:
            said.append(f"{default}'s ImageNet weights cannot be downloaded from here: not a candidate")
    size = (BACKBONE_SIZE, BACKBONE_SIZE)
    for model, weights in backbones.items():
        source = "imagenet" if weights != pretrained_file else weights
        found.append(Candidate(f"finetune:{model}@{BACKBONE_SIZE}", recipe("finetune", model=model, pretrained=source),
                               size))
        found.append(Candidate(f"probe:{model}@{BACKBONE_SIZE}",
                               recipe("finetune", model=model, pretrained=source, head_only=True), size))
    return found, said


def detail(train: list[Path], side: int | None, resize: images.Resize = "crop", seed: int = 0) -> float | None:
    """The median of what DETAIL_SAMPLE of the training image files `train` (`Dataset.image_files`), decoded at
    the first photo size above PHOTO_OWN, lose through PHOTO_OWN px (images.detail_lost); None where the images'
    median shorter side `side` (or no file) leaves no such size."""
    larger = [s for s in PHOTO_SIZES if s > PHOTO_OWN and s <= (side or 0)]
    if not larger or not train:
        return None
    picked = np.random.default_rng(seed).permutation(len(train))[:DETAIL_SAMPLE]
    lost = []
    for i in picked:
        try:
            pixels = images.decode_image(train[i], None, (larger[0], larger[0]), resize=resize or "crop")
        except CnnlabError:  # an unreadable file, left out of the data too (--skip-bad-images)
            continue
        lost.append(images.detail_lost(pixels, PHOTO_OWN))
    return float(np.median(lost)) if lost else None
