"""What a dead worker costs an elastic job: two "machines" (two `cnnlab train --nnodes 2 --max-restarts 1`
launchers on loopback) train `seed` on a CIFAR-10 subset; machine 1's worker is SIGKILLed at a random moment
between two checkpoints. Measured per round:

- detect + resume: from the kill to the restarted process 0 saying "resuming ... at epoch E, step S" (the
  agents notice the death, stop the group, meet again, the workers start, read the data from the cache and
  receive the checkpoint);
- work lost: the training time between the checkpoint it resumed from and the kill, in seconds and steps
  (at most --checkpoint-every steps);
- the whole job's wall time against an uninterrupted job's.

    python benchmarks/elastic.py [--rounds 3] [--subset 10000] [--checkpoint-every 20] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cnnlab.run import Run
from common import CNNLAB, DATA, HERE, machine, save


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_job(work: Path, flags: list[str]) -> list[subprocess.Popen]:
    port, jobs = free_port(), []
    for rank in range(2):
        home = work / f"node{rank}"
        home.mkdir(parents=True)
        log = (home / "launcher.log").open("w")
        jobs.append(subprocess.Popen([*CNNLAB, "train", "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint",
                                      f"127.0.0.1:{port}", "--max-restarts", "1", *flags, "--out", "run"], cwd=home,
                                     stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        time.sleep(0.3)
    return jobs


def workers_of(pid: int) -> list[int]:
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if f"PPid:\t{pid}\n" in (d / "status").read_text():
                found.append(int(d.name))
        except OSError:
            pass
    return found


def wait_all(jobs: list[subprocess.Popen]) -> None:
    for job in jobs:
        if job.wait(timeout=1800):
            sys.exit(f"a launcher failed (exit {job.returncode})")


def one_round(work: Path, flags: list[str], every: int, kill: bool) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    jobs = start_job(work, flags)
    run, log0 = work / "node0" / "run", work / "node0" / "launcher.log"
    if not kill:
        wait_all(jobs)
        return {"wall_seconds": round(time.monotonic() - t0, 1)}
    checkpoint = run / Run.CHECKPOINT
    while not checkpoint.exists():  # the first checkpoint
        time.sleep(0.05)
    first = checkpoint.stat().st_mtime
    while checkpoint.stat().st_mtime == first:  # the second: a full interval measured
        time.sleep(0.05)
    interval = checkpoint.stat().st_mtime - first
    time.sleep(random.uniform(0.05, 0.95) * interval)  # a random moment before the third
    saved = checkpoint.stat().st_mtime
    os.kill(workers_of(jobs[1].pid)[0], signal.SIGKILL)
    killed, lost = time.monotonic(), time.time() - saved
    while not re.search(r"resuming run at epoch \d+, step \d+", log0.read_text()):
        time.sleep(0.05)
    resumed = time.monotonic() - killed
    wait_all(jobs)
    return {"wall_seconds": round(time.monotonic() - t0, 1), "detect_and_resume_seconds": round(resumed, 2),
            "work_lost_seconds": round(lost, 2), "work_lost_steps": round(lost / interval * every, 1),
            "checkpoint_interval_seconds": round(interval, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--subset", type=int, default=10_000)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    random.seed(0)
    flags = ["--data", str(DATA), "--subset", str(args.subset), "--epochs", str(args.epochs), "--batch-size", "256",
             "--checkpoint-every", str(args.checkpoint_every), "--no-report", "--threads", "1"]
    work, rows = HERE / "work" / "elastic", []
    one_round(work, flags, args.checkpoint_every, kill=False)  # warm-up, not counted: the cache, the page cache
    for r in range(args.rounds):  # interleaved: uninterrupted, killed, uninterrupted, killed, ...
        for kill in (False, True):
            row = {"killed": kill, **one_round(work, flags, args.checkpoint_every, kill)}
            rows.append(row)
            print(f"round {r + 1} {'killed' if kill else 'uninterrupted'}: {json.dumps(row)}", flush=True)
    clean = [x["wall_seconds"] for x in rows if not x["killed"]]
    killed = [x for x in rows if x["killed"]]
    summary = {key: round(sum(x[key] for x in killed) / len(killed), 2)
               for key in ("detect_and_resume_seconds", "work_lost_seconds", "work_lost_steps")}
    summary["extra_wall_seconds"] = round(sum(x["wall_seconds"] for x in killed) / len(killed)
                                          - sum(clean) / len(clean), 1)
    print(f"mean over {len(killed)} kills: {json.dumps(summary)}")
    info = machine()
    save(f"elastic-{info['cpu_class']}", {"machine": info, "flags": flags, "rows": rows, "mean": summary,
                                          "command": "python benchmarks/elastic.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
