"""Local server processes: free loopback ports, start in their own session, wait, stop."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from components.errors import StackError

LOOPBACK = "127.0.0.1"
_GLOG_FATAL = re.compile(r"^F\d{4} ")  # glog's fatal prefix: F, then month and day


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not alive.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def executable(name: str) -> str:
    """An executable of this environment first (weed, mlflow), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found: install the pipeline extras (make setup)")
    return found


@dataclass
class ServerState:
    pid: int | None = None
    port: int = 0
    log: str = ""


def spawn_server(home: Path, name: str, argv: list[str], env: dict | None = None) -> ServerState:
    """Start a server in its own session (it outlives the CLI), logging to home/logs."""
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as handle:
        process = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=home,
            start_new_session=True,  # survives the CLI; stopped as a process group
        )
    return ServerState(pid=process.pid, log=str(log_path))


def wait_healthy(name: str, server: ServerState, healthy, timeout: float) -> None:
    """Until ``healthy()``; a server that exits or stays unhealthy is an error with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(server.pid):
            raise StackError(f"{name} exited during start-up:\n{log_tail(server.log)}")
        if healthy():
            return
        time.sleep(0.3)
    stop_server(server)
    raise StackError(f"{name} was not healthy after {timeout:.0f}s:\n{log_tail(server.log)}")


def stop_server(server: ServerState, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after ``timeout``."""
    if not pid_alive(server.pid):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(server.pid):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(server.pid, os.WNOHANG)
        time.sleep(0.2)
    if pid_alive(server.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)


def log_tail(path: str, lines: int = 20) -> str:
    """The log's last lines, led by its fatal lines: a Go server's fatal error is followed by
    goroutine stacks that would otherwise push the reason out of the tail."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    tail = text[-lines:]
    fatal = [line for line in text[:-lines] if _GLOG_FATAL.match(line)]
    return "\n".join([*fatal[-3:], *(["..."] if fatal else []), *tail])
