"""What machine a measurement was taken on, for reports that must name it."""
from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, instruction flags) of the first core, which says it for all (the file repeats
    per core); empty where there is no /proc/cpuinfo."""
    name, flags = "", frozenset[str]()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = frozenset(line.split(":", 1)[1].split())
            if name and flags:
                break
    except OSError:
        pass
    return name, flags


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction flags as Linux names them (avx2, avx512f, avx512_vnni, amx_tile...)."""
    return _cpuinfo()[1]


def cpu_name() -> str:
    """The processor and its widest vector instructions: hosts sold under one name ("AMD EPYC") came
    with and without AVX-512 here, and llama.cpp and torch ran ~2x slower without it."""
    name, flags = _cpuinfo()
    name = name or platform.processor() or platform.machine()
    if not flags:
        return name
    simd = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{name} ({simd}{', AMX' if 'amx_tile' in flags else ''})"


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


def return_freed_memory() -> None:
    """Hand memory the process has freed back to the system (glibc's malloc_trim; elsewhere nothing).
    Layer-by-layer work frees ~1 GB per 8B layer, much of it in blocks glibc keeps for reuse: measured
    on the 8B shapes cut to 4 layers, gptq's peak resident size was 4.30 GiB without this after each
    layer and 3.96 GiB with it (bench/results/scale.md)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """Looked up once, among the symbols the process already has (no library search each layer)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # TypeError: Windows cannot open the process itself this way
        return None
