"""`Batches`: an epoch's training batches, finished, as airbench's `CifarLoader` hands them to its loop.

    batches = Batches(x_train, y_train, batch_size=512, seed=0, augment="flip-translate", norm=norm)
    for step, xb, yb in batches.epoch(epoch):       # or .epoch(epoch, start=step, rng=state) to resume
        ...                                          # xb: normalized, augmented, mixed, channels-last

Each epoch draws its shuffle, augmentations and mixing from one generator seeded by (seed, epoch), in this
order: the permutation, then per step the augmentation's numbers, then MixUp/CutMix's. So an epoch is
the same whatever happened before it, and `rng_state()` taken after a step lets a resumed run draw exactly
what the interrupted one would have: a resumed run is bit-for-bit the uninterrupted one.

Under several processes (`world`) every process walks the same permutation and takes its shard of each
global batch (dist.shard), so the processes together see what one process would. A last batch smaller than
the number of processes is empty on every process: the step is then (None, None), the same on all.

The images stay where the data set keeps them (on a CPU: the memory-mapped cache, never copied whole);
each batch is gathered, converted and augmented on `device`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cnnlab import dist
from cnnlab.data import augment as augmentations
from cnnlab.data import mix
from cnnlab.data.dataset import Normalization
from cnnlab.dist import World


class Batches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int, augment: str = "none",
                 norm: Normalization | None = None, num_classes: int | None = None, world: World = World(),
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)  # (a no-op for the CPU: the mapped cache stays)
        self.batch_size, self.seed, self.world = batch_size, seed, world
        self.norm = norm  # None: the inputs are features already (a probe's embeddings), taken as they are
        self.num_classes = num_classes if num_classes is not None else (int(y.max()) + 1 if len(y) else 1)
        self.augment, self.mixing = augmentations.get(augment), augmentations.mixers(augment)
        self.steps = -(-len(y) // batch_size)  # per epoch; the last batch may be smaller
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0, rng: torch.Tensor | None = None
              ) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor | None]]:
        """The steps of `epoch` from `start` on (with `rng`, the generator's state there: see rng_state)."""
        g = self.generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.y), generator=g).to(self.device)
        if start:
            g.set_state(rng)
        for step in range(start, self.steps):
            idx = dist.shard(self.world, perm[step * self.batch_size:(step + 1) * self.batch_size])
            if not len(idx):
                yield step, None, None
                continue
            if self.norm is None:
                yield step, self.x[idx], self.y[idx]
                continue
            xb = self.augment(self.norm(self.x[idx]), g, epoch=epoch, idx=idx, norm=self.norm)
            yb = self.y[idx]
            if self.mixing:  # MixUp/CutMix: the labels become class probabilities
                xb, yb = mix.mix(self.mixing, xb, yb, g, self.num_classes)
            yield step, xb.contiguous(memory_format=torch.channels_last), yb

    def rng_state(self) -> torch.Tensor:
        """The epoch generator's state after the last batch handed out: what a mid-epoch checkpoint keeps."""
        return self.generator.get_state()
