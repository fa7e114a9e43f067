"""What the fault tests share: the table's row, a service stopped or killed, and the CLI
run as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class FaultRow:
    fault: str
    point: str
    seconds: float | None  # from the fault (or the command's start) to the error; None: none
    message: str  # what the user reads (its first line)
    survived: str  # what was kept


def stop_service(stack, service: str, *, kill: bool = False) -> None:
    """Stop (SIGTERM, waited for) or kill (SIGKILL) the stack's "s3" or "mlflow" server."""
    from components.local.processes import pid_alive

    server = getattr(stack.read_state(), service)
    if kill:  # the servers run in sessions of their own: the whole group, as a crash would
        os.killpg(server.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while pid_alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        stack._stop_server(server)


def fod_process(stack, cwd: Path, *args: str) -> subprocess.Popen:
    """``fod ARGS`` as a user runs it against ``stack``, in the background; its output (both
    streams) piped as text."""
    env = os.environ | stack.settings().env() | {"FOD_HOME": str(stack.home)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def last_line(output: str) -> str:
    return next((line for line in reversed(output.splitlines()) if line.strip()), "")
