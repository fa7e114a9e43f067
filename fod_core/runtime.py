"""Process-wide CPU settings FOD needs, applied by every entry point before any work.

Two things make FOD's CPU training several times slower than it needs to be:

* The RBF target and sharp attention maps produce subnormal floats, which x86 CPUs
  process up to ~50x slower. Flushing them to zero must be switched on *before* PyTorch
  starts its worker threads: they copy the setting from the thread that creates them.
* Every step allocates and frees attention-sized buffers (hundreds of MB). glibc serves
  those with fresh ``mmap`` pages that the kernel must fault in and zero on every step;
  keeping freed memory in the heap for reuse halves the step time on CPU.

* PyTorch's OpenMP workers belong to the thread that starts a parallel op. A second
  thread that runs one (a decode thread resizing an image) gets workers of its own, and
  once a process has more of them than cores, libgomp's idle workers stop spinning and
  sleep between ops: every later op pays a wake-up, 20-30% on FOD's many small ops. So
  for inference helper threads decode only (``AnomalyDetector.predict``), and PyTorch
  runs on one thread. Training measured the other way round (its feature extraction resizes in
  threads: see ``fod_core.cache._decoded_batches``).

``FOD_MALLOC_TUNING=0`` leaves the allocator alone (memory is then returned to the OS
sooner, at that cost in speed); ``FOD_FLUSH_DENORMAL=0`` keeps subnormals (only useful
to measure what these settings buy, as the benchmark's reference baseline does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_malloc_tuned = False


def _tune_glibc_malloc() -> bool:
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("FOD_MALLOC_TUNING", "1") == "0":
        return _malloc_tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 62)
    ok = ok and mallopt(_M_TOP_PAD, 256 << 20)
    _malloc_tuned = bool(ok)
    if not ok:
        log.debug("mallopt refused the allocator settings; continuing without them")
    return _malloc_tuned


def configure_cpu_numerics() -> None:
    """Flush subnormal floats to zero and keep large freed buffers for reuse."""
    if os.environ.get("FOD_FLUSH_DENORMAL", "1") != "0":
        torch.set_flush_denormal(True)
    _tune_glibc_malloc()
