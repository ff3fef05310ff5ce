"""This process's resident memory: its peak, and the peak within one step of a longer run."""
from __future__ import annotations

import os
import resource
import sys
import threading


def peak_rss_bytes() -> int:
    """VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across the
    fork/exec that started us and report the caller's memory."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class StepPeak:
    """The largest resident size seen while a block runs, sampled every `interval` seconds.

    Sampled rather than read from the kernel's high-water mark: resetting that mark per step
    (/proc/self/clear_refs) would also make `/usr/bin/time` and a parent's getrusage report only
    the last step's peak, and those must keep saying what the whole command needed. A spike
    shorter than the interval can be missed. `peak` is None where /proc is not available."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="step-peak-rss")

    def _sample(self) -> None:
        now = rss_bytes()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> StepPeak:
        if self.peak is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
