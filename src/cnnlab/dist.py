"""Data-parallel training on PyTorch's own engine: torch.distributed with DistributedDataParallel.

`torchrun --nproc_per_node N -m cnnlab train ...` (or `cnnlab train --nproc N`, which runs that) starts N
processes; each one calls `init()`, which reads torchrun's environment and joins the process group:
NCCL between GPUs, Gloo between CPU processes. Outside torchrun, `init()` returns a one-process `World`
and every helper here does nothing, so the training loop reads the same either way.

Each global batch is split between the ranks by position (rank r takes every world-size-th image), the
gradients are averaged by DDP, and so W ranks with B/W images each take the step one process takes with
B images. Only rank 0 writes files or prints.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cnnlab.errors import CnnlabError

# How long a collective may wait for a silent rank before the job fails instead of hanging.
TIMEOUT = timedelta(seconds=float(os.environ.get("CNNLAB_DIST_TIMEOUT", 300)))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init() -> World:
    """Join torchrun's process group when launched by torchrun; a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank on a machine takes its own GPU."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.distributed else device


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(world: World, value):
    """Rank 0's `value` on every rank (a path, say)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: ranks must take the same branch or the next collective hangs."""
    if not world.distributed:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_shards(world: World, part: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every rank's `shard` of it (rank r held rows r, r + size, ...): a CPU tensor."""
    if not world.distributed:
        return part
    parts: list = [None] * world.size
    dist.all_gather_object(parts, part.cpu())
    whole = torch.empty(sum(len(p) for p in parts), *part.shape[1:], dtype=part.dtype)
    for r, p in enumerate(parts):
        whole[r::world.size] = p
    return whole


def shard(world: World, idx: torch.Tensor) -> torch.Tensor:
    return idx[world.rank::world.size] if world.distributed else idx


def per_rank_batch(world: World, batch_size: int) -> int:
    if batch_size % world.size:
        raise CnnlabError(f"--batch-size {batch_size} is the global batch and must divide evenly between "
                          f"{world.size} processes")
    return batch_size // world.size


def close(together: bool = False) -> None:
    """Leave the process group (if this process joined one) before the process exits.

    `together` (after a run that ended normally) first waits for every rank: rank 0 still evaluates and
    writes the report while the others are done, and a rank tearing Gloo down alone was seen to abort
    ("terminate called without an active exception") in about 1 of 12 two-process runs here.
    """
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> int:
    """`cnnlab train --nproc N ...`: the same command in N processes on this machine; returns the exit code.

    torchrun's own machinery runs in this process (torch.distributed.run), so that a failed rank ends as
    cnnlab's one line (each rank prints its own `cnnlab: error: ...`) and an exit code, not as the
    launcher's ChildFailedError traceback.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its banner, failure tables and signal notices
    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "cnnlab"])
    args.training_script_args = list(argv)  # not parsed by torchrun's parser: it took --monitor for its own
    # --monitor-interval (argparse matches abbreviations even after the script's name)
    try:
        torchrun(args)
    except ChildFailedError as e:
        return _report_failure(e.failures)
    except SignalException as e:  # Ctrl-C or SIGTERM reached the launcher; it passed the signal to the processes,
        # which stopped after a checkpoint and said so themselves: 130 for both, as one process ends
        return 130 if int(e.sigval) in (signal.SIGINT, signal.SIGTERM) else 128 + int(e.sigval)
    return 0


def _report_failure(failures: dict) -> int:
    """The exit code of the process that failed first for a reason of its own (it has printed it)."""
    by_time = sorted(failures.items(), key=lambda kv: kv[1].timestamp)
    rank, failure = next(((r, f) for r, f in by_time if f.exitcode != LOST_CONTACT), by_time[0])
    if failure.exitcode == LOST_CONTACT:
        print("cnnlab: error: the training processes lost contact with each other", file=sys.stderr)
        return 1
    if failure.exitcode < 0:  # killed by a signal: the process could not say why itself
        print(f"cnnlab: error: training process {rank} was killed by signal {-failure.exitcode}", file=sys.stderr)
        return 1
    return failure.exitcode


LOST_CONTACT = 75  # a process' exit code when a collective failed because another process had gone


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process ended (which says why itself)."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1"):  # not one of several processes
        return False
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "gloo"))
