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

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os

import torch

from fod_core.config import Precision

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_malloc_tuned = False
_warned_emulated_bf16 = False  # once per process, not once per batch


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _tune_glibc_malloc() -> bool:
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("FOD_MALLOC_TUNING", "1") == "0":
        return _malloc_tuned
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (macOS, musl): nothing to tune
        return False
    ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 62)
    ok = ok and mallopt(_M_TOP_PAD, 256 << 20)
    _malloc_tuned = bool(ok)
    if not ok:
        log.debug("mallopt refused the allocator settings; continuing without them")
    return _malloc_tuned


def release_free_memory() -> None:
    """Give the heap's free pages back to the system between phases (glibc's
    ``malloc_trim``). The allocator tuning keeps freed buffers for reuse within a phase;
    across phases that memory is stranded, above all in the arenas of the threads that
    decoded images, and the next phase's peak would stand on top of it."""
    trim = getattr(_libc(), "malloc_trim", None)
    if _malloc_tuned and trim is not None:
        trim(0)


def configure_cpu_numerics() -> None:
    """Flush subnormal floats to zero and keep large freed buffers for reuse."""
    if os.environ.get("FOD_FLUSH_DENORMAL", "1") != "0":
        torch.set_flush_denormal(True)
    _tune_glibc_malloc()


def resolve_precision(device: torch.device, precision: Precision | str) -> Precision:
    """AUTO: bf16 on a CUDA device that has it, fp32 on CPU. bf16 on CPU is only as fast
    as the CPU's bf16 matmuls: native with AMX or AVX512-BF16, emulated (far slower than
    fp32) without. On bottle it also lost 0.003 AUPRO against fp32 (BENCHMARKS.md), over
    the 0.002 that would let AUTO choose it where it is native."""
    precision = Precision(precision)
    if precision is Precision.AUTO:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return Precision.BF16 if cuda_bf16 else Precision.FP32
    if precision is Precision.BF16 and device.type == "cpu":
        from fod_core.roofline import machine

        global _warned_emulated_bf16
        here = machine()
        if not here.native_bf16 and not _warned_emulated_bf16:
            _warned_emulated_bf16 = True
            log.warning(
                "bf16 on this CPU (%s) is emulated: it has neither AMX nor AVX512-BF16, so "
                "every bf16 matmul runs in software, many times slower than fp32 (on an AVX2 "
                "EPYC a first batch did not finish in 3 minutes). Use --precision fp32.",
                here.name,
            )
    return precision


def autocast_for(device: torch.device, precision: Precision | str):
    """bf16 autocast where ``resolve_precision`` picks it; fp32 otherwise. Training and
    scoring both enter it, so the two agree on what runs in bf16."""
    if resolve_precision(device, precision) is not Precision.BF16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
