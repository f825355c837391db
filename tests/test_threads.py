"""CPU threads: the governor follows other processes' load, the user's settings win, and an OpenMP
variable set after `import torch` comes too late (why cnnlab sets the count through torch instead)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cnnlab.hardware import cpu_class, usable_cores
from cnnlab.training import threads

HOG = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"  # busy until its parent ends


def fresh_python(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in threads.USER_KEYS + ("CNNLAB_THREADS",)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                         check=True, timeout=120)
    return out.stdout.strip()


@pytest.mark.skipif(usable_cores() < 2, reason="one core: one thread either way")
def test_openmp_reads_its_environment_when_torch_loads_not_later():
    before = fresh_python("import torch; print(torch.get_num_threads())", OMP_NUM_THREADS="1")
    after = fresh_python("import os, torch; os.environ['OMP_NUM_THREADS'] = '1'; print(torch.get_num_threads())")
    assert before == "1" and after != "1"


def test_the_users_thread_settings_turn_the_governor_off():
    assert threads.governed({}) and not threads.governed({"OMP_NUM_THREADS": "2"})
    assert not threads.governed({"CNNLAB_THREADS": "keep"})
    assert not threads.ThreadGovernor(enabled=False).enabled


class ScriptedLoad:
    """A machine whose load the test writes: each `second(others, own)` is one second in which other processes
    used `others` cores and this one `own`; the governor reads it through its public `read` seam."""

    def __init__(self):
        self.now = (0.0, 0.0, 0.0)
        self.set_to: list[int] = []

    def read(self) -> threads.Reading:
        return self.now

    def advance(self, seconds: float, others: float, own: float) -> None:
        t, busy, mine = self.now
        self.now = (t + seconds, busy + (others + own) * seconds, mine + own * seconds)


def test_governor_gives_up_a_core_another_process_takes_and_takes_it_back():
    load = ScriptedLoad()
    gov = threads.ThreadGovernor(every=1.0, enabled=True, max_threads=2, read=load.read,
                                 set_threads=load.set_to.append)

    def second(others: float, own: float) -> int:
        load.advance(1.0, others, own)
        return gov.tick()

    assert second(0.0, 2.0) == 2 and load.set_to == []
    assert second(1.0, 1.0) == 2  # one look is not enough: a second one must agree
    assert second(1.0, 1.0) == 1 and load.set_to == [1]
    assert second(0.3, 1.0) == 1  # under half a core: counted as free; again, two looks
    assert second(0.2, 1.0) == 2 and load.set_to == [1, 2]
    load.advance(0.5, 2.0, 0.0)  # within `every` seconds of the last look: no look at all
    assert gov.tick() == 2 and second(2.0, 0.0) == 2 and second(2.0, 0.0) == 1


def test_governor_is_off_for_one_core_and_for_the_users_settings():
    load = ScriptedLoad()
    assert not threads.ThreadGovernor(enabled=True, max_threads=1, read=load.read).enabled
    assert not threads.ThreadGovernor(enabled=False, max_threads=2, read=load.read).enabled


def test_governor_reads_a_proc_stat_file(tmp_path):
    """The default reading, from a file in /proc/stat's format (the test writes its load there)."""
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  {3 * hz} 0 {hz} 500 7 {hz} 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    t, busy, own = threads.read_proc(stat)
    assert busy == 5.0 and 0 <= own and abs(t - time.monotonic()) < 5


@pytest.mark.skipif(usable_cores() < 2 or not os.path.exists("/proc/stat"), reason="needs 2 cores and /proc")
def test_governor_measures_a_real_busy_process(monkeypatch):
    """Against the real /proc/stat, with a busy process of the test's own: its core is given up (on a machine
    already busy, the other load only makes that sooner). The count is the test's, not torch's now."""
    monkeypatch.delenv("CNNLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    set_to = []
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        gov = threads.ThreadGovernor(every=0.5, max_threads=2, set_threads=set_to.append)
        assert gov.enabled
        deadline = time.monotonic() + 10
        while gov.threads == gov.max_threads and time.monotonic() < deadline:
            time.sleep(0.1)
            gov.tick()
        assert gov.threads == 1 and set_to == [1]  # it gave up the busy process' core
    finally:
        hog.kill()
        hog.wait()


def test_cpu_class_reads_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    for flags, expected in (("fpu avx2 avx512f avx512_bf16", "avx512_bf16"), ("avx2 avx512f", "avx512f"),
                            ("sse4_2 avx2 fma", "avx2"), ("sse4_2", "other"), ("avx2 amx_bf16", "avx512_bf16")):
        info.write_text(f"model name\t: Test CPU\nflags\t\t: {flags}\n")
        assert cpu_class(info) == expected


def test_doctor_reports_the_machine_and_measures_it(capsys):
    import json

    from cnnlab import cli

    assert cli.main(["doctor", "--json", "--seconds", "0.1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu"]["class"] == cpu_class() and info["cpu"]["cores"] == usable_cores()
    assert info["precision"] in ("fp32", "bf16") and info["precision_why"].startswith(info["precision"])
    assert info["measured"]["matmul_gflops"]["fp32"] > 0
    steps, expected = info["measured"]["steps"], info["measured"]["expected_train_seconds"]
    assert set(steps) == set(expected) == {"seed", "quick", "fast"}
    # seed: 15 epochs of 782 steps; the estimate is the measured step times that many
    assert expected["seed"] == pytest.approx(782 * 15 * steps["seed"]["ms_per_step"] / 1000, rel=0.01)
    assert cli.main(["doctor", "--seconds", "0.1"]) == 0
    text = capsys.readouterr().out
    assert f"(class {cpu_class()})" in text and "expected   quick:" in text


def test_denormals_flush_to_zero_once_cnnlab_loads_unless_kept():
    code = "import torch, cnnlab.device; print((torch.tensor([1e-39]) * 1).item() == 0)"
    assert fresh_python(code) == "True"
    assert fresh_python(code, CNNLAB_DENORMALS="keep") == "False"


def test_a_run_leaves_the_thread_count_as_it_found_it(tmp_path, cifar_python_dir):
    import torch

    from cnnlab import training
    from cnnlab.config import DataConfig, TrainConfig

    before = torch.get_num_threads()
    training.train(TrainConfig(epochs=1, batch_size=50, threads=1), DataConfig(path=str(cifar_python_dir)),
                out=tmp_path / "run", with_report=False)
    assert torch.get_num_threads() == before
