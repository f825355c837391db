"""Where this process stands in a job of several processes, read from the launcher's environment, without
PyTorch: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or SLURM's, which
`adopt_slurm` turns into torchrun's so that everything after reads one set.

    srun -N2 --ntasks-per-node=2 cnnlab train ...            # four processes, one job: SLURM's variables
    srun -N2 --ntasks-per-node=1 torchrun --nnodes 2 ...      # torchrun inside: its variables win

`srun` starts every task itself (no elastic agent, so no restarts); the rendezvous is the first host of the
step's node list, on port `CNNLAB_MASTER_PORT` or one derived from the job id (two jobs sharing a node take
different ports).
"""

from __future__ import annotations

import os
import re
import socket

from cnnlab.errors import CnnlabError


def adopt_slurm(env: dict[str, str] | None = None) -> bool:
    """Under `srun` with several tasks (and no torchrun inside), set torchrun's variables from SLURM's; returns
    whether it did. The batch script itself (sbatch, one process, no job step of several tasks) is left alone."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "SLURM_PROCID" not in env:
        return False
    tasks = env.get("SLURM_STEP_NUM_TASKS") or (env.get("SLURM_NTASKS") if "SLURM_STEP_ID" in env else None)
    if not tasks or int(tasks) <= 1:
        return False
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        raise CnnlabError("srun started several tasks but SLURM_STEP_NODELIST is not set; launch with "
                          "`srun --ntasks-per-node=1 torchrun --nnodes $SLURM_NNODES --nproc_per_node N "
                          "--rdzv-backend c10d --rdzv-endpoint HOST:PORT -m cnnlab train ...` instead")
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=tasks, LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               MASTER_ADDR=env.get("MASTER_ADDR") or first_host(nodes), MASTER_PORT=env.get("MASTER_PORT") or str(
                   int(env.get("CNNLAB_MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)))
    return True


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[007-012,20],cpu1" -> "gpu007" (the zero padding kept)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise CnnlabError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def host() -> str:
    return socket.gethostname()


def job() -> str | None:
    """Under torchrun's elastic agent: this job's identity, the same for every restart of a worker on this
    machine (the agent's host, process and rendezvous id); None otherwise. A restarted process 0 recognises its
    own run directory by it (lifecycle.elastic_restart)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return f"{host()}:{os.getppid()}:{os.environ['TORCHELASTIC_RUN_ID']}"


def restarts_allowed() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
