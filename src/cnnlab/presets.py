"""Named training recipes. Each is a TrainConfig; a comment on each field says why it has that value."""

from __future__ import annotations

from dataclasses import replace

from .config import TrainConfig
from .errors import CnnlabError

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
)

# The tutorial's second model: the same, trained through its ImageDataGenerator.
SEED_AUG = replace(
    SEED,
    augment="seed",  # rotation ±20°, width/height shift ±20%, horizontal flip, nearest fill
)

PRESETS: dict[str, TrainConfig] = {"seed": SEED, "seed-aug": SEED_AUG}


def get(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise CnnlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
