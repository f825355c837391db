"""The `seed` training step on a quiet machine and beside one busy process, under each OpenMP setting.

    .venv/bin/python benchmarks/busy_host.py [--rounds 5] [--steps 60] [--isa native|avx2]

PyTorch's CPU kernels run on OpenMP (GNU libgomp in the pip wheel). By default its threads spin-wait for
each other between parallel regions; when another process holds one of the cores, the thread that waits
for a descheduled partner burns its own time slice and every small operation pays a whole scheduler tick.
libgomp reads its settings once, when torch loads it, so each setting runs in a child process started
with that environment. The children run in interleaved rounds, quiet and busy alternately, and each
figure is the median over rounds of the mean step time of `--steps` steps (after a warm-up), so the
drift of a shared host hits every setting alike.

- slowdown: busy / quiet step time of the same setting;
- against default quiet: busy step time / the default setting's quiet step time, which is what a user
  feels when the machine gets busy (the target is at most 1.6x: one core of two taken leaves 2/3 of the CPU).

`--isa avx2` caps PyTorch's kernels and oneDNN at AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) and runs
fp32, which is what `auto` precision picks on such a CPU: an emulation of an AVX2-only CPU, labelled so.
Writes benchmarks/results/busy_host[-avx2].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# What each setting puts in the child's environment. `cnnlab` sets nothing: the step runs as cnnlab's
# training loop runs it, with its ThreadGovernor ticking (CNNLAB_THREADS=keep turns the governor off).
SETTINGS: dict[str, dict[str, str]] = {
    "default (spin)": {"CNNLAB_THREADS": "keep"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "CNNLAB_THREADS": "keep"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000", "CNNLAB_THREADS": "keep"},
    "1 thread": {"OMP_NUM_THREADS": "1", "CNNLAB_THREADS": "keep"},
    "cnnlab": {},
}
HOG = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"  # busy until its parent ends
OWN_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "CNNLAB_THREADS")


def child(steps: int, precision: str) -> None:
    """Run in a fresh process: time `steps` seed steps after a warm-up; print the mean in ms."""
    import torch

    from cnnlab import models
    from cnnlab.device import keep_freed_memory
    from cnnlab.presets import SEED
    from cnnlab.training.optim import make_optimizer
    from cnnlab.training.threads import ThreadGovernor
    from common import training_step

    keep_freed_memory()
    torch.manual_seed(0)
    model = models.build("seed").to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    step = training_step(model, make_optimizer(SEED, model), 64, dtype)
    governor = ThreadGovernor(every=0.5)  # off under CNNLAB_THREADS=keep or OMP_NUM_THREADS
    warm_until = time.perf_counter() + (1.5 if governor.enabled else 0.0)
    for i in range(10**9):  # a warm-up of 10 steps, and long enough for the governor's first looks
        step()
        governor.tick()
        if i >= 9 and time.perf_counter() > warm_until:
            break
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
        governor.tick()
    print(json.dumps({"ms": (time.perf_counter() - t0) / steps * 1e3, "threads": torch.get_num_threads()}))


def measure(env_extra: dict[str, str], steps: int, precision: str, isa_env: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in OWN_KEYS}
    env.update(isa_env)
    env.update(env_extra)
    out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps), "--precision", precision],
                         capture_output=True, text=True, env=env, check=True, cwd=os.path.dirname(__file__))
    return json.loads(out.stdout.strip().splitlines()[-1])["ms"]


def busy_process() -> subprocess.Popen:
    """One process that keeps a core busy, as another user's job would (it ends when this process does)."""
    return subprocess.Popen([sys.executable, "-c", HOG])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.steps, args.precision)
    from common import cpu_class, machine

    isa_env = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"} if args.isa == "avx2" else {}
    precision = "fp32" if args.isa == "avx2" or cpu_class() != "avx512_bf16" else "bf16"
    times: dict[str, dict[str, list[float]]] = {s: {"quiet": [], "busy": []} for s in SETTINGS}
    for r in range(args.rounds):
        for load in ("quiet", "busy"):
            hog = busy_process() if load == "busy" else None
            try:
                for name, env in SETTINGS.items():
                    times[name][load].append(measure(env, args.steps, precision, isa_env))
            finally:
                if hog:
                    hog.kill()
                    hog.wait()
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    base = statistics.median(times["default (spin)"]["quiet"])
    rows = {}
    print(f"\nseed step, batch 64, {precision}, {args.isa} kernels; "
          f"medians of {args.rounds} rounds of {args.steps} steps")
    print(f"{'setting':<26}{'quiet ms':>10}{'busy ms':>10}{'slowdown':>10}{'vs default quiet':>18}")
    for name, t in times.items():
        q, b = statistics.median(t["quiet"]), statistics.median(t["busy"])
        rows[name] = {"quiet_ms": round(q, 2), "busy_ms": round(b, 2), "slowdown": round(b / q, 2),
                      "busy_vs_default_quiet": round(b / base, 2), "quiet_rounds": t["quiet"], "busy_rounds": t["busy"]}
        print(f"{name:<26}{q:>10.1f}{b:>10.1f}{b / q:>9.2f}x{b / base:>17.2f}x")
    from common import save

    save("busy_host" + ("-avx2" if args.isa == "avx2" else ""),
         {"machine": machine(), "cpu_class": cpu_class() if args.isa == "native" else "avx2 (emulated)",
          "precision": precision, "rounds": args.rounds, "steps": args.steps, "settings": rows})


if __name__ == "__main__":
    main()
