"""This process's peak resident memory, readable per step of a longer run."""
from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """VmHWM belongs to this process image and can be reset (reset_peak_rss); ru_maxrss would carry
    the parent's peak across the fork/exec that started us and report the caller's memory."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Sets the peak back to the current resident size (Linux >= 4.0, clear_refs value 5), so the
    next peak_rss_bytes() is the peak of what ran since; False where the system cannot. The kernel
    keeps one mark: a parent's getrusage(RUSAGE_CHILDREN) then reports the peak since the last reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
