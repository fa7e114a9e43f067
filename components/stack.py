"""The embedded default stack: a real S3 server (SeaweedFS) and a real MLflow tracking
server, both on 127.0.0.1, started and stopped by ``fod stack up|down|status``.

State lives in ``.fod/`` (git-ignored): generated credentials, the S3 data, MLflow's
sqlite database, logs, and ``stack.json`` with ports and process ids. ``up`` is
idempotent: a healthy stack is left alone, a dead one is restarted on its data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.settings import DEFAULT_BUCKET, StackSettings, fod_home, read_credentials

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5055
# SeaweedFS 'mini' runs master, volume, filer, S3, WebDAV and admin servers, each with
# an HTTP and a gRPC port. All are pinned (to free ports) so two stacks never collide.
_WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
)


class StackError(RuntimeError):
    """A server could not start, died, or a port it needs is taken."""


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


def _bin(name: str) -> str:
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


@dataclass
class StackState:
    s3: ServerState = field(default_factory=ServerState)
    mlflow: ServerState = field(default_factory=ServerState)
    bucket: str = DEFAULT_BUCKET

    @property
    def s3_endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3.port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.mlflow.port}"

    def to_dict(self) -> dict:
        return {
            "s3": asdict(self.s3),
            "mlflow": asdict(self.mlflow),
            "bucket": self.bucket,
            "s3_endpoint": self.s3_endpoint,
            "mlflow_uri": self.mlflow_uri,
        }

    @classmethod
    def from_dict(cls, data: dict) -> StackState:
        return cls(
            s3=ServerState(**data["s3"]),
            mlflow=ServerState(**data["mlflow"]),
            bucket=data.get("bucket", DEFAULT_BUCKET),
        )


class EmbeddedStack:
    """SeaweedFS S3 + MLflow server under one state folder."""

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        s3_port: int = DEFAULT_S3_PORT,
        mlflow_port: int = DEFAULT_MLFLOW_PORT,
        bucket: str = DEFAULT_BUCKET,
    ) -> None:
        self.home = Path(home).resolve() if home else fod_home()
        self.s3_port = s3_port
        self.mlflow_port = mlflow_port
        self.bucket = bucket

    # -- files ------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    def read_state(self) -> StackState | None:
        if not self.state_file.is_file():
            return None
        return StackState.from_dict(json.loads(self.state_file.read_text()))

    def _write_state(self, state: StackState) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.to_dict(), indent=2))
        tmp.replace(self.state_file)

    def _credentials(self) -> dict[str, str]:
        """Generated once per state folder, readable by the owner only."""
        path = self.home / "credentials.env"
        if not path.is_file():
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(
                    "# generated by `fod stack up`; local loopback stack only, never commit\n"
                    f"AWS_ACCESS_KEY_ID=fod{secrets.token_hex(8)}\n"
                    f"AWS_SECRET_ACCESS_KEY={secrets.token_urlsafe(30)}\n"
                )
        return read_credentials(self.home)

    def settings(self) -> StackSettings:
        state = self.read_state()
        if state is None:
            raise StackError("the embedded stack was never started: run `fod stack up`")
        return self.settings_for(state)

    # -- health -----------------------------------------------------------------------
    def s3_healthy(self, state: StackState) -> bool:
        return pid_alive(state.s3.pid) and self._s3_probe(state)

    @staticmethod
    def mlflow_healthy(state: StackState) -> bool:
        if not pid_alive(state.mlflow.pid):
            return False
        try:
            with urllib.request.urlopen(f"{state.mlflow_uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def status(self) -> dict:
        state = self.read_state()
        if state is None:
            return {"running": False, "s3": "not started", "mlflow": "not started"}
        s3_ok, mlflow_ok = self.s3_healthy(state), self.mlflow_healthy(state)
        return {
            "running": s3_ok and mlflow_ok,
            "s3": f"{'healthy' if s3_ok else 'down'} at {state.s3_endpoint}",
            "mlflow": f"{'healthy' if mlflow_ok else 'down'} at {state.mlflow_uri}",
            "bucket": state.bucket,
            "home": str(self.home),
        }

    # -- start / stop -----------------------------------------------------------------
    def up(self, *, timeout: float = 60.0) -> StackSettings:
        """Start what is not running; return the settings to reach the stack."""
        state = self.read_state() or StackState(bucket=self.bucket)
        self._credentials()
        if not self.s3_healthy(state):
            self._stop_server(state.s3)
            state.s3 = self._start_s3(state.bucket, timeout)
            self._write_state(state)
        if not self.mlflow_healthy(state):
            self._stop_server(state.mlflow)
            state.mlflow = self._start_mlflow(state, timeout)
        self._write_state(state)
        return self.settings()

    def down(self) -> None:
        state = self.read_state()
        if state is None:
            return
        from components.deployment import LocalServing

        LocalServing(self.home).stop_all()  # model servers first: they use MLflow and S3
        self._stop_server(state.mlflow)
        self._stop_server(state.s3)
        state.mlflow.pid = state.s3.pid = None
        self._write_state(state)

    def _pick_port(self, wanted: int, what: str, flag: str) -> int:
        if wanted == 0:
            return free_port()
        if not port_is_free(wanted):
            raise StackError(
                f"port {wanted} for {what} is taken by another process: stop it, or choose "
                f"another with `fod stack up {flag} PORT` (0 picks a free one)"
            )
        return wanted

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> ServerState:
        return spawn_server(self.home, name, argv, env)

    def _wait(self, name: str, server: ServerState, healthy, timeout: float) -> None:
        wait_healthy(name, server, healthy, timeout)

    def _start_s3(self, bucket: str, timeout: float) -> ServerState:
        port = self._pick_port(self.s3_port, "S3 (SeaweedFS)", "--s3-port")
        credentials = self._credentials()
        config = self.home / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "fod",
                            "credentials": [
                                {
                                    "accessKey": credentials["AWS_ACCESS_KEY_ID"],
                                    "secretKey": credentials["AWS_SECRET_ACCESS_KEY"],
                                }
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        data = self.home / "s3"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            _bin("weed"),
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.config={config}",
            f"-bucket={bucket}",
            f"-s3.port={port}",
            "-master.telemetry=false",
            *(f"-{flag}={free_port()}" for flag in _WEED_PORT_FLAGS),
        ]
        server = self._spawn("s3", argv)
        server.port = port
        probe = StackState(s3=server, bucket=bucket)
        self._wait("S3 server (SeaweedFS)", server, lambda: self._s3_probe(probe), timeout)
        log.info("S3 (SeaweedFS) healthy at %s", probe.s3_endpoint)
        return server

    def _s3_probe(self, state: StackState) -> bool:
        try:
            self.settings_for(state).s3_client(retries=1, timeout=2).head_bucket(
                Bucket=state.bucket
            )
        except Exception:  # any failure means "not (yet) healthy"
            return False
        return True

    def settings_for(self, state: StackState) -> StackSettings:
        credentials = self._credentials()
        return StackSettings(
            mlflow_uri=state.mlflow_uri,
            access_key=credentials["AWS_ACCESS_KEY_ID"],
            secret_key=credentials["AWS_SECRET_ACCESS_KEY"],
            s3_endpoint=state.s3_endpoint,
            bucket=state.bucket,
        )

    def _start_mlflow(self, state: StackState, timeout: float) -> ServerState:
        port = self._pick_port(self.mlflow_port, "the MLflow server", "--mlflow-port")
        db = self.home / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{state.bucket}/mlflow",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--workers",
            "1",
        ]
        env = self.settings_for(state).env() | {"MLFLOW_ENABLE_TELEMETRY": "false"}
        server = self._spawn("mlflow", argv, env)
        server.port = port
        probe = StackState(s3=state.s3, mlflow=server, bucket=state.bucket)
        self._wait("MLflow server", server, lambda: self.mlflow_healthy(probe), timeout)
        log.info("MLflow healthy at %s", probe.mlflow_uri)
        return server

    @staticmethod
    def _stop_server(server: ServerState, timeout: float = 15.0) -> None:
        stop_server(server, timeout)


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
            raise StackError(f"{name} exited during start-up:\n{_tail(server.log)}")
        if healthy():
            return
        time.sleep(0.3)
    stop_server(server)
    raise StackError(f"{name} was not healthy after {timeout:.0f}s:\n{_tail(server.log)}")


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


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
