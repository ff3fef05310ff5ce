"""What machine a measurement was taken on, for reports that must name it."""
from __future__ import annotations

import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compute_device(local_rank: int = 0):
    """Where torch work goes: this process's GPU when there is one (under torchrun, one GPU per
    local rank), else the CPU."""
    import torch

    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def machine_name() -> str:
    """The processor that did the torch work, for benchmark tables."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU (host: {cpu_name()})"
    return cpu_name()
