"""CPU threads: the governor follows other processes' load, the user's settings win, and an OpenMP
variable set after `import torch` comes too late (why cnnlab sets the count through torch instead)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from cnnlab import threads
from cnnlab.hardware import cpu_class, usable_cores

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


def fake_governor(monkeypatch, max_threads: int) -> tuple[threads.ThreadGovernor, list, list]:
    """A governor whose /proc readings and thread changes are scripted."""
    set_to, samples = [], []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(threads.ThreadGovernor, "_sample", lambda self: samples.pop(0))
    monkeypatch.setattr(os, "sysconf", lambda name: 100)  # 100 jiffies a second
    samples.append((0.0, 0, 0))
    gov = threads.ThreadGovernor(every=1.0, enabled=True)
    gov.max_threads = gov.threads = max_threads
    return gov, samples, set_to


def test_governor_gives_up_a_core_another_process_takes_and_takes_it_back(monkeypatch):
    gov, samples, set_to = fake_governor(monkeypatch, 2)
    t = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: t[0])

    def second(others: float, own: float) -> int:
        """One second in which other processes used `others` cores and this one `own`."""
        last = gov._last
        t[0] += 1.0
        samples.append((t[0], last[1] + int((others + own) * 100), last[2] + int(own * 100)))
        return gov.tick()

    assert second(0.0, 2.0) == 2 and set_to == []
    assert second(1.0, 1.0) == 2  # one look is not enough: a second one must agree
    assert second(1.0, 1.0) == 1 and set_to == [1]
    assert second(0.3, 1.0) == 1  # under half a core: counted as free; again, two looks
    assert second(0.2, 1.0) == 2 and set_to == [1, 2]
    assert gov.tick() == 2 and samples == []  # within `every` seconds: no look at all


@pytest.mark.skipif(usable_cores() < 2 or not os.path.exists("/proc/stat"), reason="needs 2 cores and /proc")
def test_governor_measures_a_real_busy_process(monkeypatch):
    monkeypatch.delenv("CNNLAB_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        gov = threads.ThreadGovernor(every=0.5)
        assert gov.enabled
        deadline = time.monotonic() + 10
        while gov.threads == gov.max_threads and time.monotonic() < deadline:
            time.sleep(0.1)
            gov.tick()
        assert gov.threads < gov.max_threads  # it gave up the busy process' core
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(before)


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
