"""Peak memory of each phase of a command: where a training's memory goes.

A pod's memory request must cover the command's highest phase, and a user who meets an
out-of-memory kill needs to know which phase it was. Each phase's peak resident memory is
sampled by a background thread (``/proc/self/statm`` every few milliseconds) rather than
read from the kernel's high-water mark, because resetting that mark would make
``/usr/bin/time -v`` or a container's own accounting report less than the truth. A block
held for less than the sampling interval can pass unseen, so the process's exact peak (the
kernel's) is kept beside the phases as a check. With FOD's allocator tuning
(``fod_core.runtime``) freed memory stays in the heap for reuse: a phase then starts at
the high-water of those before it, and its own growth is ``peak - start``. On CUDA each
phase also records the allocator's peak.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

MB = 2**20
SAMPLE_SECONDS = 0.005
_STATM = "/proc/self/statm"


def current_rss_bytes() -> int | None:
    """Resident memory now (Linux), or None where /proc is absent."""
    try:
        with open(_STATM) as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def process_peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's resident memory, since it started."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


@dataclass
class PhaseMemory:
    """One phase: its peak resident memory, the resident memory it started and ended at,
    its wall time, and (on CUDA) the allocator's peak."""

    name: str
    peak_rss_mb: float
    start_rss_mb: float
    end_rss_mb: float
    seconds: float
    cuda_peak_mb: float | None = None


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="fod-memory-sampler", daemon=True)
        self.peak = current_rss_bytes() or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(SAMPLE_SECONDS):
            now = current_rss_bytes()
            if now is not None and now > self.peak:
                self.peak = now

    def finish(self) -> int:
        self._stop_event.set()
        self.join()
        now = current_rss_bytes()
        return max(self.peak, now or 0)


class PhaseMeter:
    """Times phases and samples their peak memory: ``with meter.phase("training"): ...``.

    Phases do not nest; the sampling thread runs only inside one. Where /proc is absent
    (macOS, Windows) a phase's peak is the process's peak so far: an upper bound."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.phases: list[PhaseMemory] = []
        self._cuda = torch.device(device).type == "cuda" if device is not None else False
        self._sampled = current_rss_bytes() is not None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        start = current_rss_bytes() or 0
        sampler = _Sampler() if self._sampled else None
        if sampler is not None:
            sampler.start()
        started = time.perf_counter()
        try:
            yield
        finally:
            peak = sampler.finish() if sampler is not None else process_peak_rss_bytes()
            self.phases.append(
                PhaseMemory(
                    name=name,
                    peak_rss_mb=round(peak / MB, 1),
                    start_rss_mb=round(start / MB, 1),
                    end_rss_mb=round((current_rss_bytes() or 0) / MB, 1),
                    seconds=round(time.perf_counter() - started, 2),
                    cuda_peak_mb=(
                        round(torch.cuda.max_memory_allocated() / MB, 1) if self._cuda else None
                    ),
                )
            )

    def highest(self) -> PhaseMemory | None:
        return max(self.phases, key=lambda p: p.peak_rss_mb, default=None)

    def to_dict(self) -> dict:
        """For a manifest or a metrics file: each phase, and the process's exact peak so far."""
        return {
            "phases": [asdict(p) for p in self.phases],
            "process_peak_rss_mb": round(process_peak_rss_bytes() / MB, 1),
            "sampled": self._sampled,
        }

    def describe(self) -> str:
        """One line for a log: each phase's peak, the highest marked."""
        top = self.highest()
        parts = [
            f"{p.name} {p.peak_rss_mb / 1024:.2f} GB" + (" (highest)" if p is top else "")
            for p in self.phases
        ]
        return "peak memory per phase: " + ", ".join(parts)
