"""`Batches`: an epoch's training batches, finished, as airbench's `CifarLoader` hands them to its loop.

    batches = Batches(x_train, y_train, batch_size=512, seed=0, augment="flip-translate", norm=norm)
    for step, xb, yb in batches.epoch(epoch):       # or .epoch(epoch, start=step, rng=state) to resume
        ...                                          # xb: normalized, augmented, mixed, channels-last

Each epoch draws its shuffle, augmentations and mixing from one generator seeded by (seed, epoch), in this
order: the permutation, then per step the augmentation's numbers, then MixUp/CutMix's. So an epoch is
the same whatever happened before it, and `rng_state()` taken after a step lets a resumed run draw exactly
what the interrupted one would have: a resumed run is bit-for-bit the uninterrupted one. All of an epoch's
numbers are drawn on the CPU at its start, in that order (the same numbers, so the same batches, as drawing
them step by step), and copied to the device in one transfer per dtype: a step never waits for the host.

Under several processes (`world`) every process walks the same permutation and takes its shard of each
global batch (dist.shard), so the processes together see what one process would. A last batch smaller than
the number of processes is empty on every process: the step is then (None, None), the same on all.

The images stay where the data set keeps them (on a CPU: the memory-mapped cache, never copied whole);
each batch is gathered, converted and augmented on `device`. On a GPU the uint8 images are either resident
there (copied once, when they fit: `resident_fits`) or streamed (`stream=True`, or --stream): a background
thread gathers each batch's rows from the host copy into pinned memory and copies them to the GPU on a side
stream a few batches ahead (timm's PrefetchLoader and FFCV's loader do the same), and the step's stream waits
on that copy's event, never on the host. Conversion, normalization and augmentation stay on the device, so
the batches are the same bytes either way (on a CPU the thread only gathers).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import torch

from cnnlab import dist
from cnnlab.data import augment as augmentations
from cnnlab.data import mix
from cnnlab.data.dataset import Normalization
from cnnlab.device import free_memory, to_device
from cnnlab.dist import World

AHEAD = 3  # batches a streamed epoch gathers and copies ahead of the step (FFCV's default batches_ahead)
RESIDENT_SHARE = 0.5  # uint8 images stay resident on a GPU when they take at most this share of its free memory
# (after the model is there): the rest is left to activations, whose peak a run finds only when it is too late


def resident_fits(x: torch.Tensor, device: torch.device) -> bool:
    """Whether the uint8 images `x` may be copied whole to `device` (always, for the CPU: nothing moves)."""
    if device.type != "cuda":
        return True
    return x.numel() * x.element_size() <= RESIDENT_SHARE * free_memory(device)


class Batches:
    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, seed: int, augment: str = "none",
                 norm: Normalization | None = None, num_classes: int | None = None, world: World = World(),
                 device: torch.device | str = "cpu", stream: bool = False):
        self.device = torch.device(device)
        self.stream = stream or not resident_fits(x, self.device)
        self.x = x if self.stream else x.to(self.device)  # (a no-op for the CPU: the mapped cache stays)
        self.y = y.to(self.device)
        self.batch_size, self.seed, self.world = batch_size, seed, world
        self.norm = norm  # None: the inputs are features already (a probe's embeddings), taken as they are
        self.num_classes = num_classes if num_classes is not None else (int(y.max()) + 1 if len(y) else 1)
        self.augment, self.mixing = augmentations.get(augment), augmentations.mixers(augment)
        self.steps = -(-len(y) // batch_size)  # per epoch; the last batch may be smaller
        self.states: dict[int, torch.Tensor] = {}  # the epoch generator's state after each step's numbers
        self.handed = 0  # the last step handed out

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0, rng: torch.Tensor | None = None
              ) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor | None]]:
        """The steps of `epoch` from `start` on (with `rng`, the generator's state there: see rng_state)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.y), generator=g)
        if start:
            g.set_state(rng)
        shards = [self.part(perm, step) for step in range(start, self.steps)]
        on_device, draws = to_device((perm, self._draw(g, shards, start)), self.device)
        rows = streamed(self.x, shards, self.device) if self.stream else None
        for step, drawn in zip(range(start, self.steps), draws, strict=True):
            self.handed = step
            idx = self.part(on_device, step)
            xs = next(rows) if rows is not None else None
            if not len(idx):
                yield step, None, None
                continue
            xs = self.x[idx] if xs is None else xs
            if self.norm is None:
                yield step, xs, self.y[idx]
                continue
            xb = self.augment.apply(self.norm(xs), drawn[0], epoch=epoch, idx=idx, norm=self.norm)
            yb = self.y[idx]
            if self.mixing:  # MixUp/CutMix: the labels become class probabilities
                xb, yb = mix.apply(xb, yb, drawn[1], self.num_classes)
            yield step, xb.contiguous(memory_format=torch.channels_last), yb

    def _draw(self, g: torch.Generator, shards: list[torch.Tensor], start: int) -> list[tuple | None]:
        """Each step's augmentation and mixing numbers (None for a step without images, or without
        augmentation: features), and the generator's state after each step (for rng_state)."""
        self.states, draws = {}, []
        for step, shard in enumerate(shards, start):
            drawn = None
            if len(shard) and self.norm is not None:
                shape = (len(shard), *self.x.shape[1:])
                drawn = (self.augment.draw(g, shape), mix.draw(self.mixing, g, shape) if self.mixing else None)
            draws.append(drawn)
            self.states[step] = g.get_state()
        return draws

    def part(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        """This process's indices of global batch `step` of the permutation."""
        return dist.shard(self.world, perm[step * self.batch_size:(step + 1) * self.batch_size])

    def rng_state(self) -> torch.Tensor:
        """The epoch generator's state after the last batch handed out: what a mid-epoch checkpoint keeps."""
        return self.states[self.handed]


def in_batches(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """`x` in consecutive batches for `device` (evaluation, prediction): views where `x` already is there (a
    CPU, or images resident on the GPU), else streamed ahead from the host copy."""
    starts = range(0, len(x), batch_size)
    if x.device == device or device.type != "cuda":
        yield from (x[i:i + batch_size] for i in starts)
        return
    yield from streamed(x, [torch.arange(i, min(i + batch_size, len(x))) for i in starts], device)


def streamed(x: torch.Tensor, shards: list[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """The rows `shards` of the host tensor `x`, one batch after another, on `device`: gathered by a background
    thread AHEAD batches in advance (into pinned memory and copied on a side stream, for a GPU). The consumer's
    stream waits on each copy's event; the thread stops with the generator."""
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    ready: queue.Queue = queue.Queue(maxsize=AHEAD)
    stop = threading.Event()

    def gather() -> None:
        try:
            for idx in shards:
                if stop.is_set():
                    return
                rows = x[idx]
                event = None
                if cuda:
                    with torch.cuda.stream(side):
                        rows = rows.pin_memory().to(device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(side)
                ready.put((rows, event))
        except BaseException as e:  # (a read error of the mapped cache): raised where the batch is taken
            ready.put((e, None))

    worker = threading.Thread(target=gather, daemon=True, name="cnnlab-stream")
    worker.start()
    try:
        for _ in shards:
            rows, event = ready.get()
            if isinstance(rows, BaseException):
                raise rows
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                rows.record_stream(torch.cuda.current_stream(device))  # (its memory belongs to the side stream)
            yield rows
    finally:
        stop.set()
        while worker.is_alive():  # unblock a thread waiting to put, then let it see `stop`
            try:
                ready.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.01)
