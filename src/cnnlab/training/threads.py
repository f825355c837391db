"""CPU threads: a thread count that follows the machine's load, set through PyTorch, not OpenMP's environment.

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the pip wheels), whose threads split every operation
between the cores and spin-wait for each other between operations. On a quiet machine that is the fastest
way. Beside one busy process it is ruinous: the operation waits for the thread that shares its core with
the other process, and a thread spinning for a descheduled partner burns its own time slice.
benchmarks/busy_host.py measured the alternatives (figures in the README, per CPU class): libgomp's
passive waiting costs a third on a quiet machine and does not fix the busy one; one thread per free core
does. So `ThreadGovernor` watches how much CPU other processes take (from /proc/stat, a few microseconds
a look) and sets torch's thread count to the cores they leave free, rechecking every second or so.

libgomp reads its environment once, when `import torch` loads it (a variable set later changes nothing:
tests/test_threads.py checks this in fresh processes), so the count is set with torch.set_num_threads,
which works at any time, and cnnlab sets no OpenMP variable. The user's own settings always win:
`--threads N` (TrainConfig.threads) and OMP_NUM_THREADS (which torchrun sets to 1 for each of several
processes) fix the count, and CNNLAB_THREADS=keep leaves everything as PyTorch would have it.

A caveat that comes with following the load: PyTorch's kernels split their sums differently for another
thread count, so a run whose thread count changed differs from one whose did not in the last bits (one
training step on airbench-s: up to 4e-3 in a weight). A run on a machine whose load stays the same is
bit-for-bit repeatable and resumable; `--threads N` makes every run so. The log says each change.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from cnnlab.hardware import usable_cores

log = logging.getLogger(__name__)

USER_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def user_settings(environ=None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: env[k] for k in USER_KEYS if k in env}


def governed(environ=None) -> bool:
    """Whether cnnlab may choose the thread count (the user set none, and did not say keep)."""
    env = os.environ if environ is None else environ
    return env.get("CNNLAB_THREADS") != "keep" and "OMP_NUM_THREADS" not in env


Reading = tuple[float, float, float]  # (monotonic seconds, all CPUs' busy seconds, this process' CPU seconds)


def keeps_thread_count(fn):
    """A run started from Python leaves the process' thread count as it found it (the governor and --threads
    change it while the run lasts)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper


def _busy_jiffies(stat: str) -> int:
    """All CPUs' non-idle time from the first line of /proc/stat (user nice system idle iowait irq softirq)."""
    fields = [int(v) for v in stat.split()[1:8]]
    return fields[0] + fields[1] + fields[2] + fields[5] + fields[6]


def _own_jiffies() -> int:
    """This process' CPU time, all threads (utime + stime from /proc/self/stat)."""
    after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(after_name[11]) + int(after_name[12])


def read_proc(stat: str | Path = "/proc/stat") -> Reading:
    """The machine's reading from /proc: now, the busy time of every CPU, and this process' own time."""
    hz = os.sysconf("SC_CLK_TCK")
    with open(stat) as f:
        busy = _busy_jiffies(f.readline())
    return time.monotonic(), busy / hz, _own_jiffies() / hz


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the cores other processes leave free.

    Call `tick()` now and then (the training loop does at each host sync point); it looks at most every
    `every` seconds, so it costs nothing measurable. Off (every tick a no-op) when the user chose a thread
    count, on systems without /proc, and with one core.

    `max_threads` (default: torch's count now, at most the usable cores) is the count on a quiet machine;
    `read` (default `read_proc`) gives the machine's CPU times, and `set_threads` (default
    torch.set_num_threads) applies a change: tests script a load through them.
    """

    def __init__(self, every: float = 1.0, enabled: bool | None = None, say: bool = False, *,
                 max_threads: int | None = None, read: Callable[[], Reading] | None = None,
                 set_threads: Callable[[int], None] | None = None):
        import torch

        self.every, self.say = every, say  # say: log each change of the thread count
        self.read = read or read_proc
        self.set_threads = set_threads or torch.set_num_threads
        self._pending: int | None = None  # a change is made when two looks in a row agree on it
        self.max_threads = max_threads or min(torch.get_num_threads(), usable_cores())
        self.enabled = (governed() if enabled is None else enabled) and self.max_threads > 1 \
            and (read is not None or Path("/proc/stat").exists())
        self.threads = self.max_threads if max_threads else torch.get_num_threads()
        self.last = self.read() if self.enabled else None

    def others(self, now: Reading) -> float:
        """Cores' worth of CPU that other processes used since the last look."""
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9))

    def tick(self) -> int:
        """Adjust the thread count if a look is due; return the count in use."""
        if not self.enabled or time.monotonic() - self.last[0] < self.every:
            return self.threads
        now = self.read()
        if now[0] - self.last[0] < self.every:  # (a scripted reading may run on its own clock)
            return self.threads
        free = self.max_threads - int(self.others(now) + 0.5)  # a core counts as taken at half its time
        want = max(1, min(self.max_threads, free))
        if want != self.threads and want == self._pending:
            if self.say:
                log.info(f"threads: {self.threads} -> {want} (other processes use {self.others(now):.1f} of "
                         f"{self.max_threads} cores)")
            self.set_threads(want)
            self.threads = want
        self._pending, self.last = want, now
        return self.threads
