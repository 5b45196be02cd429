"""The machine a benchmark ran on: CPU model, the SIMD flags that matter to XLA:CPU, cores, load."""

import os
import platform
from pathlib import Path

SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def host_description() -> dict:
    """{"cpu", "cores"} and, where /proc/cpuinfo exists (Linux), "simd": which of `SIMD_FLAGS` the
    CPU has."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                           if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                     if line.startswith("flags"))
        info["simd"] = [f for f in SIMD_FLAGS if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
