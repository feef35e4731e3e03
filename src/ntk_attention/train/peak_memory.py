"""Peak memory: of a block (the training loop), for a run's results record, and of one call
above the memory already resident (benchmarks and experiments)."""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["PeakMemory", "peak_rss_growth", "status_bytes"]


class PeakMemory:
    """Peak memory while the block runs: CUDA's max allocated bytes, and on CPU the resident
    set size sampled every 20 ms from /proc (the process high-water mark ``ru_maxrss``
    where /proc is missing, which also counts what ran before the block)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * self._page
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak_rss = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._rss())

    def report(self) -> dict[str, float]:
        out = {"rss_mib": round(self.peak_rss / 2**20, 1)}
        if self.device.type == "cuda":
            out["cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return out


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes, e.g. "VmRSS" (resident now) or "VmHWM"
    (its high-water mark). Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the file says kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_growth(fn: Callable[[], Any]) -> int:
    """Bytes of peak resident memory while ``fn()`` runs above the resident memory before it
    (every page it touched): the kernel's high-water mark VmHWM, reset to the current RSS
    through /proc/self/clear_refs, minus VmRSS before. Linux only; run it in a fresh process,
    since memory an earlier call freed may still be resident and hide the peak."""
    before = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    return status_bytes("VmHWM") - before
