"""Process-wide numeric settings FOD needs, applied by every entry point before any work.

The RBF target and sharp attention maps produce subnormal floats, which x86 CPUs process
up to ~50x slower. Flushing them to zero must be switched on *before* PyTorch starts its
worker threads: they copy the setting from the thread that creates them, and it cannot
be changed in them afterwards. So CLI, training, loading and serving call this first.
"""

from __future__ import annotations

import torch


def configure_cpu_numerics() -> None:
    """Flush subnormal floats to zero (no effect on results at FOD's scale of values)."""
    torch.set_flush_denormal(True)
