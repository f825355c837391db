"""Several machines, simulated on this one: two torchrun launchers (`cnnlab train --nnodes 2`, c10d rendezvous
on 127.0.0.1), each in its own working directory with its own cache and its own copy of the data, as machines
without a shared disk. Also: elastic restarts that resume, SLURM's variables, the data the machines must agree
on, and waiting for a slow first decode without a collective's timeout."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cnnlab import cluster
from cnnlab.errors import CnnlabError
from cnnlab.run import Run
from conftest import write_image_folder

CNNLAB = [sys.executable, "-m", "cnnlab"]
# 150 CIFAR-like training images, global batch 30: 5 steps an epoch, 15 images a step on each machine.
FLAGS = ["--batch-size", "30", "--precision", "fp32", "--no-report", "--seed", "5", "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine(tmp_path: Path, rank: int, data: Path) -> Path:
    """A machine's working directory with its own copy of the data and its own (empty) cache."""
    home = tmp_path / f"node{rank}"
    shutil.copytree(data, home / "data")
    return home


def env_of(home: Path, **extra) -> dict:
    return {**os.environ, "CNNLAB_CACHE": str(home / "cache"), "OMP_NUM_THREADS": "1", "CNNLAB_DIST_TIMEOUT": "60",
            **extra}


def start(homes: list[Path], *args, port: int, extra_env: dict | None = None, nnodes: int | None = None
          ) -> list[subprocess.Popen]:
    """The same command on each machine, launched in order (c10d gives the first launcher rank 0)."""
    jobs = []
    for rank, home in enumerate(homes):
        log = (home / "launcher.log").open("w")
        command = [*CNNLAB, "train", "--nnodes", str(nnodes or len(homes)), "--node-rank", str(rank), "--rdzv-endpoint",
                   f"127.0.0.1:{port}", "--data", "data", *args]
        jobs.append(subprocess.Popen(command, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                     env=env_of(home, **(extra_env or {}))))
        time.sleep(0.3)
    return jobs


def finish(jobs: list[subprocess.Popen], homes: list[Path], timeout: float = 300) -> list[str]:
    try:
        for job in jobs:
            job.wait(timeout=timeout)
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    return [(home / "launcher.log").read_text() for home in homes]


def two_machines(tmp_path: Path, data: Path, *args, extra_env=None) -> tuple[list[Path], list[str], list[int]]:
    homes = [machine(tmp_path, r, data) for r in range(2)]
    jobs = start(homes, *args, port=free_port(), extra_env=extra_env)
    logs = finish(jobs, homes)
    return homes, logs, [job.returncode for job in jobs]


@pytest.fixture(scope="module")
def seed_on_two(tmp_path_factory, cifar_python_dir):
    """The tutorial's network trained to the end on two machines, checkpointing every 2 steps."""
    tmp = tmp_path_factory.mktemp("two")
    homes, logs, codes = two_machines(tmp, cifar_python_dir, "--epochs", "3", "--checkpoint-every", "2",
                                      *FLAGS, "--out", "run")
    assert codes == [0, 0], logs
    return homes, logs


def test_seed_on_two_machines_without_a_shared_disk(seed_on_two):
    (home0, home1), (log0, log1) = seed_on_two
    assert (home0 / "run" / "model.safetensors").is_file() and (home0 / "run" / "metrics.json").is_file()
    assert not (home1 / "run").exists()  # only the machine of process 0 holds the run directory
    assert f"(on {socket.gethostname()})" in log0 and "2 processes of 15 images a step" in log0
    assert "run directory" not in log1 and "Traceback" not in log0 + log1
    for home in (home0, home1):  # each machine decoded the data into its own cache
        assert any((home / "cache").rglob("meta.json"))
    config = json.loads((home0 / "run" / "config.json").read_text())
    assert config["environment"]["processes"] == 2 and config["train"]["epochs"] == 3


def test_quick_on_two_machines_one_launched_by_plain_torchrun(tmp_path, cifar_python_dir):
    homes = [machine(tmp_path, r, cifar_python_dir) for r in range(2)]
    port, args = free_port(), ["--data", "data", "--preset", "quick", "--epochs", "2", *FLAGS, "--out", "run"]
    jobs = start(homes[:1], *args[2:], port=port, nnodes=2)
    log = (homes[1] / "launcher.log").open("w")
    jobs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                  "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "cnnlab",
                                  "train", *args], cwd=homes[1], stdout=log, stderr=subprocess.STDOUT,
                                 env=env_of(homes[1])))
    logs = finish(jobs, homes)
    assert [j.returncode for j in jobs] == [0, 0], logs
    assert json.loads((homes[0] / "run" / "metrics.json").read_text())["test_accuracy"] >= 0
    assert "Epoch 2/2" in logs[0] and not (homes[1] / "run").exists()


def workers_of(launcher: int) -> list[int]:
    def parent(pid: str) -> str | None:
        try:
            return next(ln.split()[1] for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if ln.startswith("PPid:"))
        except (OSError, StopIteration):
            return None
    return [int(d.name) for d in Path("/proc").glob("[0-9]*") if parent(d.name) == str(launcher)]


def kill_machine(launcher: int) -> None:
    """The whole machine at once: its launcher and every process under it are stopped first (none of them can
    react to another's end), then killed, as a machine's death ends them all at once. (This test killed the
    workers, then the launcher; once in CI the other machine then ended after 64 s, not the usual 0.4-3 s: the
    cause is not known, and the assertion now shows that machine's log.)"""
    tree, todo = [], [launcher]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(workers_of(pid))
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def elastic_job_at_its_first_checkpoint(tmp_path: Path, data: Path, epochs: int):
    """Two machines training under --max-restarts 2, once machine 0's run directory holds a checkpoint."""
    homes = [machine(tmp_path, r, data) for r in range(2)]
    jobs = start(homes, "--epochs", str(epochs), "--checkpoint-every", "2", *FLAGS, "--out", "run", "--max-restarts",
                 "2", port=free_port())
    checkpoint = homes[0] / "run" / Run.CHECKPOINT
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and all(j.poll() is None for j in jobs):
        time.sleep(0.02)
    assert checkpoint.exists(), finish(jobs, homes)
    return homes, jobs


def test_a_killed_worker_is_restarted_and_the_job_ends_with_the_same_weights(seed_on_two, tmp_path,
                                                                              cifar_python_dir):
    """--max-restarts 2: machine 1's worker is SIGKILLed after the first checkpoint; both machines' agents
    restart their workers, every worker resumes from machine 0's checkpoint, and the weights are the bytes of
    the uninterrupted job."""
    homes, jobs = elastic_job_at_its_first_checkpoint(tmp_path, cifar_python_dir, epochs=3)
    killed = workers_of(jobs[1].pid)
    assert len(killed) == 1
    os.kill(killed[0], signal.SIGKILL)
    logs = finish(jobs, homes)
    assert [j.returncode for j in jobs] == [0, 0], logs
    assert "resuming run at epoch" in logs[0], logs[0]
    reference = seed_on_two[0][0] / "run" / "model.safetensors"
    assert (homes[0] / "run" / "model.safetensors").read_bytes() == reference.read_bytes()


def test_when_the_machine_of_the_run_directory_dies_the_others_end_in_one_line(tmp_path, cifar_python_dir):
    """Restarts cannot cover the machine that holds the run directory (and here the rendezvous): the other
    machine ends at once with one line saying where to resume, and the run resumes there to the end."""
    homes, jobs = elastic_job_at_its_first_checkpoint(tmp_path, cifar_python_dir, epochs=40)
    kill_machine(jobs[0].pid)
    killed = time.monotonic()
    log1 = finish(jobs, homes)[1]
    took = time.monotonic() - killed
    assert jobs[1].returncode == 2 and took < 30, (took, log1[-3000:])
    errors = [ln for ln in log1.splitlines() if ln.strip()]
    assert errors[-1].startswith("cnnlab: error: lost the rendezvous at 127.0.0.1:") and "--resume RUN" in errors[-1]
    assert "Traceback" not in log1 and "frame #" not in log1, log1[-2000:]
    proc = subprocess.run([*CNNLAB, "train", "--resume", "run"], cwd=homes[0], capture_output=True, text=True,
                          timeout=300, env=env_of(homes[0]))
    assert proc.returncode == 0 and "Epoch 40/40" in proc.stdout, proc.stderr


def test_torchruns_shared_store_with_restarts_is_refused(tmp_path, cifar_python_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--max-restarts", "1", "-m", "cnnlab", "train", "--data", str(cifar_python_dir),
                           *FLAGS, "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
                          env=env_of(tmp_path, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0"))
    assert proc.returncode != 0  # (plain torchrun adds its own ChildFailedError report)
    assert "torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment" in proc.stderr
    assert not (tmp_path / "r").exists()


def swap_classes(folder: Path, a: str, b: str) -> None:
    for split in ("train", "test"):
        (folder / split / a).rename(folder / split / "tmp")
        (folder / split / b).rename(folder / split / a)
        (folder / split / "tmp").rename(folder / split / b)


def test_machines_with_different_data_refuse_in_one_line_each(tmp_path):
    """The same folder on both machines but two classes' images swapped on one: caught before the first step,
    said on both machines, and no run directory made."""
    data = write_image_folder(tmp_path / "photos", classes=("a", "b", "c"), per_class=8, size=(16, 16))
    homes = [machine(tmp_path, r, data) for r in range(2)]
    swap_classes(homes[1] / "data", "a", "b")
    logs = finish(start(homes, "--epochs", "1", *FLAGS, "--out", "run", port=free_port()), homes)
    for log in logs:
        errors = [ln for ln in log.splitlines() if ln.startswith("cnnlab: error")]
        assert len(errors) == 1, log
        assert "the machines do not have the same data: process 1 on" in errors[0] and "pixels" in errors[0]
    assert not any((h / "run").exists() for h in homes)


def test_a_probe_on_two_machines_without_a_shared_cache(tmp_path, cifar_python_dir):
    """A linear probe twice: the second finds the embeddings in machine 0's cache only, and machine 1 gets them
    from process 0 instead of reading a file its disk does not have."""
    import torch

    from cnnlab import models

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"  # as torchvision's file holds them (random values, 1000 classes)
    torch.save(models.build("resnet18_imagenet", 3, 1000, (224, 224)).state_dict(), weights)
    homes = [machine(tmp_path, r, cifar_python_dir) for r in range(2)]
    for out in ("p1", "p2"):
        logs = finish(start(homes, "--model", "resnet18_imagenet", "--pretrained", str(weights), "--image-size", "32",
                            "--head-only", "--epochs", "2", *FLAGS, "--out", out, port=free_port()), homes)
        assert (homes[0] / out / "model.safetensors").is_file(), logs
    assert any((homes[0] / "cache" / "features").glob("*.safetensors"))
    assert not (homes[1] / "cache" / "features").exists()  # machine 1 never wrote an embedding file
    assert (homes[0] / "p1" / "model.safetensors").read_bytes() == (homes[0] / "p2" / "model.safetensors").read_bytes()


def test_srun_tasks_train_as_one_job(tmp_path, cifar_python_dir):
    """Two processes started as srun starts them (SLURM's variables, no torchrun) train one run."""
    port, jobs = free_port(), []
    for rank in range(2):
        slurm = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                 "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "7",
                 "CNNLAB_MASTER_PORT": str(port)}
        env = {k: v for k, v in env_of(tmp_path, **slurm).items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR")}
        jobs.append(subprocess.Popen([*CNNLAB, "train", "--data", str(cifar_python_dir), "--epochs", "1", *FLAGS,
                                      "--out", str(tmp_path / "run")], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env))
    outs = [job.communicate(timeout=180) for job in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    assert "2 processes of 15 images a step" in outs[0][0] and outs[1][0].strip() == ""
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_slurm_variables_become_torchruns():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_ID": "0",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    assert cluster.adopt_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("3", "4", "1", "gpu007", str(20000 + 123456 % 20000))
    assert cluster.first_host("a1,b[2-3]") == "a1" and cluster.first_host("node[10,12-14]") == "node10"
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]"}  # sbatch: no step
    assert not cluster.adopt_slurm(batch_script) and "WORLD_SIZE" not in batch_script
    under_torchrun = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "WORLD_SIZE": "8", "RANK": "5"}
    assert not cluster.adopt_slurm(under_torchrun) and under_torchrun["RANK"] == "5"
    with pytest.raises(CnnlabError, match="srun --ntasks-per-node=1 torchrun"):
        cluster.adopt_slurm({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})


TOGETHER = textwrap.dedent("""
    import os, sys, time
    from cnnlab import dist
    from cnnlab.errors import CnnlabError
    world = dist.init()
    def slow():  # a first decode on one machine that outlasts CNNLAB_DIST_TIMEOUT several times
        time.sleep(3 if world.rank == 1 else 0)
        return world.rank
    assert dist.together(world, "reading the data", slow) == world.rank
    def failing():
        if world.rank == 1:
            raise CnnlabError("the disk is full")
    try:
        dist.together(world, "reading the data", failing)
    except CnnlabError as e:
        print(f"rank {world.rank}: {e}", flush=True)
    if world.rank == 1:  # a process that fails alone leaves its reason for the others' machines
        dist.tell(world, "out of memory")
    dist.barrier(world)
    print(f"rank {world.rank} was told: {dist.told(world.size)}", flush=True)
    def hung():  # holds the interpreter (no heartbeat) for seconds, as a process stuck in native code would
        if world.rank == 1:
            sum(range(2 * 10**8))
    try:
        dist.together(world, "reading the data", hung)
    except CnnlabError as e:
        print(f"rank {world.rank}: {e}", flush=True)
    os._exit(0)
""")


def test_together_waits_for_a_slow_process_and_names_a_failed_or_silent_one(tmp_path):
    script = tmp_path / "together.py"
    script.write_text(TOGETHER)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], capture_output=True, text=True, timeout=120,
                          env=env_of(tmp_path, CNNLAB_DIST_TIMEOUT="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - started > 3
    host = socket.gethostname()
    for rank in (0, 1):
        assert f"rank {rank}: process 1 on {host} failed while reading the data: the disk is full" in proc.stdout
        assert f"rank {rank} was told: (1, 'process 1 on {host}: out of memory')" in proc.stdout
    assert "rank 0: process 1 gave no sign of life for 1 s while reading the data" in proc.stdout, proc.stdout
