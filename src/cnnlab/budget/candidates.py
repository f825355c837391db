"""What `--budget` may train, chosen from the data and the machine: each `Candidate` is a recipe (a preset,
perhaps a backbone and an input size) that the search then tunes.

    small images (<= 64 px)   quick, fast                                (CIFAR-sized recipes)
    photos                    photos at 64, 96 and 128 px (no larger than the images' median shorter side)
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

from cnnlab import presets
from cnnlab.config import TrainConfig
from cnnlab.models import pretrained

SMALL = 64  # images up to this side train with the CIFAR-sized recipes at their own size
PHOTO_SIZES = (64, 96, 128)  # photonet's input sizes tried from scratch (its 96 px default in the middle)
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
             require: tuple[str, ...] = ()) -> tuple[list[Candidate], list[str]]:
    """The candidates for images of `image_size` (as decoded; `source_side`: the files' median shorter side
    before resizing), and a line for the log on what was found. `download`: also the `finetune` preset's
    backbone when its weights are not here but can be fetched; `require`: candidates another process chose,
    whose backbones are then candidates here whether their weights are on this machine yet or not."""
    def recipe(name: str, **changes) -> TrainConfig:
        return replace(presets.get(name), device=device, seed=seed, **changes)

    if max(image_size) <= SMALL:
        return [Candidate(name, recipe(name), None) for name in ("quick", "fast")], []
    side = source_side or min(image_size)
    sizes = [s for s in PHOTO_SIZES if s <= side] or [min(PHOTO_SIZES)]
    found = [Candidate(f"photos@{s}", recipe("photos"), (s, s)) for s in sizes]
    required = {name.split(":")[1].rsplit("@", 1)[0] for name in require if ":" in name}
    cached = [m for m, w in pretrained.IMAGENET.items() if pretrained.cached_path(w).is_file()]
    said = [f"backbones with weights on this machine: {', '.join(cached) or 'none'} (the hub cache"
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
