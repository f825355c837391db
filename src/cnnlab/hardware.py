"""What machine this is, read without importing PyTorch: the CPU's model, cores and vector extensions.

`cpu_class()` names the class that decides cnnlab's defaults and that every benchmark figure is labelled
with: "avx512_bf16" (native bf16 arithmetic: `auto` precision is bf16), "avx512f", "avx2" (fp32), or
"other" (no AVX2, or not an x86 CPU).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Literal

CpuClass = Literal["avx512_bf16", "avx512f", "avx2", "other"]
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(name) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
    return set(_cpuinfo_field("flags", cpuinfo).split())


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def cpu_class(cpuinfo: Path = CPUINFO) -> CpuClass:
    flags = cpu_flags(cpuinfo)
    for name in ("avx512_bf16", "avx512f", "avx2"):
        if name in flags or (name == "avx512_bf16" and "amx_bf16" in flags):
            return name  # type: ignore[return-value]
    return "other"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
