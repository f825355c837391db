"""Data-parallel training on PyTorch's own engine: torch.distributed with DistributedDataParallel.

`torchrun --nproc_per_node N -m cnnlab train ...` (or `cnnlab train --nproc N`, which runs that; with
`--nnodes`, `--rdzv-endpoint` and `--max-restarts`, on several machines) starts the processes; each one calls
`init()`, which reads the launcher's environment (torchrun's, or SLURM's: cluster.py) and joins the process
group: NCCL between GPUs, Gloo between CPU processes. Outside a launcher, `init()` returns a one-process
`World` and every helper here does nothing, so the training loop reads the same either way.

Each global batch is split between the ranks by position (rank r takes every world-size-th image), the
gradients are averaged by DDP, and so W ranks with B/W images each take the step one process takes with
B images. Only rank 0 writes files or prints. Everything that moves between processes is a tensor (values
through `broadcast` travel as the bytes of `torch.save`), so NCCL carries it as well as Gloo.

Work of unknown length that every process does on its own (reading and decoding the data: minutes for a
large folder on a cold cache) runs in `together`, which waits through the rendezvous store with a heartbeat
instead of in a collective: a long decode on one machine is never mistaken for a dead one, a dead one is
found within `CNNLAB_DIST_TIMEOUT`, and a failure on any process is told to every machine by name.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cnnlab import cluster
from cnnlab.errors import CnnlabError, EveryProcessError

# How long a collective may wait for a silent rank before the job fails instead of hanging.
TIMEOUT = timedelta(seconds=float(os.environ.get("CNNLAB_DIST_TIMEOUT", 300)))
STORE_READ_S = 15  # a launcher's wait on the rendezvous store (torchrun's c10d default: 60 s): when the machine
# holding it dies, the others' launchers learn it at their next look, or only after this long (a test saw 64 s
# once, its usual 5-20 s); the store answers in milliseconds while it lives


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


_STORE: dist.Store | None = None  # the rendezvous store, for what is not a collective (together, tell)


def init(device: str | None = None) -> World:
    """Join the launcher's process group (torchrun's, or srun's through cluster.adopt_slurm); a single process
    otherwise. `device`: the run's (--device; else $CNNLAB_DEVICE, which `cnnlab train --nproc` sets for its
    processes), which chooses the backend (backend_for); the first call decides."""
    global _STORE
    cluster.adopt_slurm()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        check_restartable()
        backend = backend_for(device or os.environ.get("CNNLAB_DEVICE", "auto"))
        if backend == "nccl":
            check_gpus(cluster.local_rank() + 1)
            torch.cuda.set_device(cluster.local_rank())
        store, rank, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT)
        _STORE = dist.PrefixStore("cnnlab/", store)
    return World(dist.get_rank(), dist.get_world_size(), cluster.local_rank())


def backend_for(device: str) -> str:
    """NCCL for a run on CUDA GPUs, Gloo for one on CPUs: `--device cpu` on a GPU machine runs on Gloo (NCCL
    moves GPU tensors only, and the CPU tensors of such a run would fail in it)."""
    return "nccl" if torch.cuda.is_available() and not device.startswith("cpu") else "gloo"


def check_gpus(processes: int) -> None:
    """One GPU for each of `processes` on this machine (at least that many), or one line that says so."""
    gpus = torch.cuda.device_count()
    if processes > gpus:
        raise CnnlabError(f"{processes} processes on this machine need a GPU each and it has {gpus}: use --nproc "
                          f"{gpus} or fewer (torchrun: --nproc-per-node), or --device cpu")


def check_restartable() -> None:
    """torchrun's restarts with the rendezvous store its agent shares with the workers (its default) leave the
    last attempt's keys in place: restarted workers then connect to the dead ones' addresses and hang or fail
    in init_process_group (PyTorch issue #135712; measured here: Gloo "connectFullMesh failed" after the
    timeout, every restart). Workers with a store of their own restart cleanly."""
    if cluster.restarts_allowed() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise CnnlabError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment "
                          "(its shared store cannot restart workers: PyTorch issue #135712); run "
                          "`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...`, or `cnnlab train --max-restarts N`, "
                          "which sets it")


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank on a machine takes its own GPU."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.distributed else device


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(world: World, value):
    """Rank 0's `value` on every rank (a path, the run's configuration, a checkpoint's state): tensors, numbers,
    strings, lists and dicts of them, sent as the bytes of `torch.save` (read back with weights_only)."""
    if not world.distributed:
        return value
    buffer = io.BytesIO()
    if world.main:
        torch.save(value, buffer)
    data = _broadcast_bytes(world, buffer.getvalue())
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _broadcast_bytes(world: World, data: bytes) -> bytes:
    device = _device()
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if world.main and data else
               torch.empty(int(length.item()), dtype=torch.uint8)).to(device)
    if len(payload):
        dist.broadcast(payload, src=0)
    return payload.cpu().numpy().tobytes()


def _device() -> torch.device:
    """Where collectives' tensors live: NCCL moves GPU tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


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


_rounds = 0  # each call of `together` has its own keys: every process makes the calls in the same order


def together(world: World, doing: str, work):
    """`work()` on every process, then wait until every process has done it, through the store rather than a
    collective: each process beats a heartbeat while it works, so the wait lasts as long as the slowest one
    (a first decode of a large folder on one machine), and ends with a one-line error naming the process and
    its machine when one fails (its own message) or falls silent for `CNNLAB_DIST_TIMEOUT`."""
    global _rounds
    if not world.distributed:
        return work()
    if _STORE is None:  # a process group that another library started: a plain barrier
        result = work()
        barrier(world)
        return result
    _rounds += 1
    key = f"together/{_rounds}"
    beating = threading.Event()
    threading.Thread(target=_beat, args=(f"{key}/beat/{world.rank}", beating), daemon=True).start()
    try:
        result, failure = work(), None
    except CnnlabError as e:
        result, failure = None, str(e)
    except Exception as e:
        result, failure = None, f"{type(e).__name__}: {e}"
        if not isinstance(e, OSError):
            _STORE.set(f"{key}/end/{world.rank}", json.dumps([cluster.host(), failure]))
            raise  # a bug is reported as one, by the process that met it
    finally:
        beating.set()
    _STORE.set(f"{key}/end/{world.rank}", json.dumps([cluster.host(), failure]))
    _wait_for_all(world, key, doing)
    return result


def _beat(key: str, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            _STORE.add(key, 1)
        except Exception:  # the store's host is gone: the waiting side finds that out
            return
        stop.wait(min(1.0, TIMEOUT.total_seconds() / 4))  # several beats within any timeout


def _wait_for_all(world: World, key: str, doing: str) -> None:
    """Every process's end of `together`: nothing when all succeeded; else one EveryProcessError, the same on
    every process (so each machine's first process says it once)."""
    ends, heard = {}, {r: (0, time.monotonic()) for r in range(world.size)}
    while len(ends) < world.size:
        for r in [r for r in range(world.size) if r not in ends]:
            if _STORE.check([f"{key}/end/{r}"]):
                ends[r] = json.loads(_STORE.get(f"{key}/end/{r}"))
                continue
            beats = _STORE.add(f"{key}/beat/{r}", 0)
            if beats != heard[r][0]:
                heard[r] = (beats, time.monotonic())
            elif time.monotonic() - heard[r][1] > TIMEOUT.total_seconds():
                raise EveryProcessError(f"process {r} gave no sign of life for {TIMEOUT.total_seconds():g} s while "
                                        f"{doing} (CNNLAB_DIST_TIMEOUT); its machine's log says why")
        time.sleep(0.2)
    failed = {r: (host, why) for r, (host, why) in ends.items() if why is not None}
    if not failed:
        return
    reasons = {why for _, why in failed.values()}
    if len(failed) == world.size and len(reasons) == 1:
        raise EveryProcessError(reasons.pop())  # the same on every process: said as one process says it
    r, (host, why) = min(failed.items())
    raise EveryProcessError(f"process {r} on {host} failed while {doing}: {why}")


def agree(world: World, what: str, value: dict) -> None:
    """Every process must hold the same `value` (a dict of JSON values, e.g. the data's fingerprint): a difference
    is one line naming the process, its machine and the first entry that differs."""
    global _rounds
    if not world.distributed or _STORE is None:
        return
    _rounds += 1
    key = f"agree/{_rounds}"
    _STORE.set(f"{key}/{world.rank}", json.dumps([cluster.host(), value]))
    _STORE.wait([f"{key}/{r}" for r in range(world.size)], TIMEOUT)
    host0, ours = json.loads(_STORE.get(f"{key}/0"))
    for r in range(1, world.size):
        host, theirs = json.loads(_STORE.get(f"{key}/{r}"))
        for name, v in ours.items():
            if theirs.get(name) != v:
                raise EveryProcessError(f"the machines do not have the same {what}: process {r} on {host} has "
                                        f"{name} {_short(theirs.get(name))} where process 0 on {host0} has "
                                        f"{_short(v)}")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def tell(world: World, message: str) -> None:
    """A process that fails leaves its reason in the store, for the others to name it (`told`)."""
    if world.distributed and _STORE is not None:
        try:
            _STORE.set(f"failed/{world.rank}", json.dumps([cluster.host(), message]))
        except Exception:  # the store's host is gone: nobody is left to tell
            pass


def told(size: int) -> tuple[int, str] | None:
    """The first process that left a reason with `tell`, and its reason as "process R on HOST: ...", or None."""
    if _STORE is None:
        return None
    try:
        for r in range(size):
            if _STORE.check([f"failed/{r}"]):
                host, message = json.loads(_STORE.get(f"failed/{r}"))
                return r, f"process {r} on {host}: {message}"
    except Exception:
        return None
    return None


def gather_shards(world: World, part: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every rank's `shard` of it (rank r held rows r, r + size, ...): a CPU tensor."""
    if not world.distributed:
        return part
    device = _device()
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world.size)]
    dist.all_gather(lengths, torch.tensor([len(part)], dtype=torch.int64, device=device))
    lengths = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(lengths), *part.shape[1:], dtype=part.dtype, device=device)  # all_gather: equal shapes
    padded[:len(part)] = part.to(device)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    whole = torch.empty(sum(lengths), *part.shape[1:], dtype=part.dtype)
    for r, (p, n) in enumerate(zip(parts, lengths, strict=True)):
        whole[r::world.size] = p[:n].cpu()
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


def launch(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, endpoint: str | None = None,
           max_restarts: int = 0) -> int:
    """`cnnlab train --nproc N [--nnodes M --rdzv-endpoint HOST:PORT] [--max-restarts R] ...`: the same command in
    N processes on this machine (and on each of M machines that run it), through torchrun's elastic agent;
    returns the exit code.

    torchrun's own machinery runs in this process (torch.distributed.run), so that a failed rank ends as
    cnnlab's one line (each rank prints its own `cnnlab: error: ...`) and an exit code, not as the
    launcher's ChildFailedError traceback. With restarts, the workers get a rendezvous store of their own
    (check_restartable says why).
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its banner, failure tables and signal notices
    if max_restarts:
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    where = (["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint",
              endpoint, "--rdzv_conf", f"join_timeout={TIMEOUT.total_seconds():g},read_timeout={STORE_READ_S}"]
             if nnodes > 1 else ["--standalone"])
    args = get_args_parser().parse_args([*where, "--nproc_per_node", str(nproc), "--max_restarts", str(max_restarts),
                                         "--monitor_interval", "0.5", "-m", "cnnlab"])
    args.training_script_args = list(argv)  # not parsed by torchrun's parser: it took --monitor for its own
    # --monitor-interval (argparse matches abbreviations even after the script's name)
    try:
        torchrun(args)
    except ChildFailedError as e:
        return _report_failure(e.failures)
    except SignalException as e:  # Ctrl-C or SIGTERM reached the launcher; it passed the signal to the processes,
        # which stopped after a checkpoint and said so themselves: 130 for both, as one process ends
        return 130 if int(e.sigval) in (signal.SIGINT, signal.SIGTERM) else 128 + int(e.sigval)
    except RendezvousTimeoutError:
        raise CnnlabError(f"the {nnodes} machines did not meet at {endpoint} within {TIMEOUT.total_seconds():g} s "
                          "(CNNLAB_DIST_TIMEOUT): start the same command on each of them, with --rdzv-endpoint a "
                          "host:port that all of them reach") from None
    except RendezvousError as e:  # the launcher holding the rendezvous is gone (its machine died), or never came
        raise CnnlabError(f"lost the rendezvous at {endpoint}: the machine holding it went away "
                          f"({type(e).__name__}). The run's checkpoint stays on the machine of process 0: when it "
                          "is back, continue there with `cnnlab train --resume RUN` (alone, or with --nnodes "
                          "again)") from None
    return 0


def _report_failure(failures: dict) -> int:
    """The exit code of the process that failed first for a reason of its own (it has printed it, or a process
    that learnt it from the store has: `told`)."""
    by_time = sorted(failures.items(), key=lambda kv: kv[1].timestamp)
    rank, failure = next(((r, f) for r, f in by_time if f.exitcode != LOST_CONTACT), by_time[0])
    if failure.exitcode == LOST_CONTACT:
        print("cnnlab: error: the training processes lost contact with each other (a process on another machine "
              "ended, or its machine went away: its log says why)", file=sys.stderr)
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
