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
from cnnlab.dist import World

AHEAD = 3  # batches a streamed epoch gathers and copies ahead of the step (FFCV's default batches_ahead)
RESIDENT_SHARE = 0.5  # uint8 images stay resident on a GPU when they take at most this share of its free memory
# (after the model is there): the rest is left to activations, whose peak a run finds only when it is too late


def resident_fits(x: torch.Tensor, device: torch.device) -> bool:
    """Whether the uint8 images `x` may be copied whole to `device` (always, for the CPU: nothing moves)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return x.numel() * x.element_size() <= RESIDENT_SHARE * free


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
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0, rng: torch.Tensor | None = None
              ) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor | None]]:
        """The steps of `epoch` from `start` on (with `rng`, the generator's state there: see rng_state)."""
        g = self.generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.y), generator=g)
        on_device = perm.to(self.device)  # once an epoch: a step slices it where it computes
        if start:
            g.set_state(rng)
        rows = (streamed(self.x, [self.part(perm, step) for step in range(start, self.steps)], self.device)
                if self.stream else None)
        for step in range(start, self.steps):
            idx = self.part(on_device, step)
            xs = next(rows) if rows is not None else None
            if not len(idx):
                yield step, None, None
                continue
            xs = self.x[idx] if xs is None else xs
            if self.norm is None:
                yield step, xs, self.y[idx]
                continue
            xb = self.augment(self.norm(xs), g, epoch=epoch, idx=idx, norm=self.norm)
            yb = self.y[idx]
            if self.mixing:  # MixUp/CutMix: the labels become class probabilities
                xb, yb = mix.mix(self.mixing, xb, yb, g, self.num_classes)
            yield step, xb.contiguous(memory_format=torch.channels_last), yb

    def part(self, perm: torch.Tensor, step: int) -> torch.Tensor:
        """This process's indices of global batch `step` of the permutation."""
        return dist.shard(self.world, perm[step * self.batch_size:(step + 1) * self.batch_size])

    def rng_state(self) -> torch.Tensor:
        """The epoch generator's state after the last batch handed out: what a mid-epoch checkpoint keeps."""
        return self.generator.get_state()


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
