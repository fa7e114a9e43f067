"""fod_core.memory: each phase's sampled peak is that phase's, not the process's so far."""

import json
import os
import subprocess
import sys

import pytest

from fod_core.memory import PhaseMeter

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="sampling reads /proc/self/statm (Linux)"
)


PHASES = """
import json
import time
import numpy as np
from fod_core.memory import MB, PhaseMeter

def touch(megabytes):
    block = np.empty(megabytes * MB, dtype=np.uint8)
    block[::4096] = 1  # every page resident
    time.sleep(0.05)  # held for a while, as a phase's tensors are (the sampling: 5 ms)
    return block

meter = PhaseMeter()
with meter.phase("big"):
    block = touch(300)
    del block
with meter.phase("small"):
    block = touch(30)
    del block
print(json.dumps({**meter.to_dict(), "describe": meter.describe()}))
"""


def test_each_phase_reports_its_own_peak():
    # A fresh process with glibc's default allocator, which returns a freed 300 MB block
    # to the system (FOD's tuning keeps it for reuse: then a later phase starts that high).
    env = {**os.environ, "FOD_MALLOC_TUNING": "0"}
    done = subprocess.run(
        [sys.executable, "-c", PHASES], capture_output=True, text=True, env=env, check=True
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    big, small = summary["phases"]
    assert [big["name"], small["name"]] == ["big", "small"]
    assert big["peak_rss_mb"] >= big["start_rss_mb"] + 280, big
    # the big phase's peak is behind: the small phase's is its own (start + about 30 MB)
    assert 20 <= small["peak_rss_mb"] - small["start_rss_mb"] <= 80, small
    assert small["peak_rss_mb"] < big["peak_rss_mb"] - 200
    assert summary["process_peak_rss_mb"] >= big["peak_rss_mb"] - 5  # the kernel's agrees
    assert "big 0." in summary["describe"] and "(highest)" in summary["describe"]


def test_a_failing_phase_is_still_recorded():
    meter = PhaseMeter()
    with pytest.raises(ValueError), meter.phase("broken"):
        raise ValueError("the phase's own error goes on")
    assert [p.name for p in meter.phases] == ["broken"]
