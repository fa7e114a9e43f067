"""Local model servers: one ``fod serve`` process per registered model, on loopback.

Each follows its ``champion`` alias (it reloads in the background when the alias moves);
``deploy`` starts it when it is not running and waits until it answers with the expected
version. State lives in ``<fod home>/serving/<name>.json`` beside the embedded stack's, and
``fod stack down`` stops these servers too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from components.errors import DeploymentError, StackError
from components.local.processes import (
    ServerState,
    free_port,
    pid_alive,
    port_is_free,
    spawn_server,
    stop_server,
    wait_healthy,
)
from components.settings import fod_home

log = logging.getLogger(__name__)

LOCAL_POLL_SECONDS = 2.0


@dataclass
class LocalServer:
    name: str
    model_uri: str
    http_port: int
    grpc_port: int
    pid: int | None = None
    log: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def status(self) -> dict | None:
        """The server's own view (served version, loading, failures); None when down."""
        try:
            with urllib.request.urlopen(
                f"{self.url}/v2/models/{self.name}/status", timeout=3
            ) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def predict(self, images: list[bytes], timeout: float = 60.0) -> list[dict]:
        """Score encoded images through the v1 endpoint (the demo's and the tests' client)."""
        import base64

        body = json.dumps(
            {"instances": [{"image_bytes": {"b64": base64.b64encode(i).decode()}} for i in images]}
        ).encode()
        request = urllib.request.Request(
            f"{self.url}/v1/models/{self.name}:predict",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["predictions"]


def spawn_model_server(
    home: Path,
    name: str,
    model_uri: str,
    *,
    http_port: int,
    grpc_port: int,
    extra: tuple[str, ...] = (),
    env: dict | None = None,
    log_name: str | None = None,
) -> LocalServer:
    """Start ``python -m components.serving`` (what ``fod serve`` runs) in its own session,
    logging under ``home/logs``; it is not waited for (``wait_healthy`` does that)."""
    argv = [
        sys.executable, "-m", "components.serving", "--model", model_uri, "--name", name,
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), *extra,
    ]  # fmt: skip
    process = spawn_server(home, log_name or name, argv, env)
    return LocalServer(name, model_uri, http_port, grpc_port, process.pid, process.log)


def _serves_with(server: LocalServer, runtime: str, precision: str = "fp32") -> bool:
    """Whether a running server scores with ``runtime`` and ``precision`` (unknown, e.g.
    busy: no; auto: whatever it resolved to)."""
    status = server.status()
    if status is None or status.get("runtime", "torch") != runtime:
        return False
    return precision == "auto" or status.get("precision", "fp32") == precision


class LocalServing:
    """The local model servers under one fod home."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.dir = Path(home or fod_home()) / "serving"

    def records_file(self, name: str) -> Path:
        """The decision record of ``name``'s local server."""
        return self.dir.parent / "records" / f"{name}.sqlite"

    def _state_file(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def get(self, name: str) -> LocalServer | None:
        path = self._state_file(name)
        return LocalServer(**json.loads(path.read_text())) if path.is_file() else None

    def servers(self) -> list[LocalServer]:
        return [LocalServer(**json.loads(p.read_text())) for p in sorted(self.dir.glob("*.json"))]

    def _save(self, server: LocalServer) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file(server.name).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(server), indent=2))
        tmp.replace(self._state_file(server.name))

    def deploy(
        self,
        name: str,
        expected_version: str,
        *,
        model_uri: str | None = None,
        http_port: int = 8080,
        grpc_port: int = 8081,
        env: dict | None = None,
        timeout: float = 180.0,
        runtime: str = "torch",
        precision: str = "fp32",
    ) -> LocalServer:
        """Serve ``model_uri`` (default: the champion alias) with ``runtime`` (and
        ``precision``, for torch) and wait for
        ``expected_version``.

        A server already running on the same URI and runtime is left running: it follows
        the alias and switches to the new version by itself, without a restart."""
        from components.registry import champion_uri

        model_uri = model_uri or champion_uri(name)
        server = self.get(name)
        if (
            server
            and pid_alive(server.pid)
            and server.model_uri == model_uri
            and _serves_with(server, runtime, precision)
        ):
            log.info("%s is served at %s; waiting for v%s", name, server.url, expected_version)
        else:
            if server:
                stop_server(ServerState(pid=server.pid))
            server = self._start(
                name, model_uri, http_port, grpc_port, env, timeout, runtime, precision
            )
        self._wait_for_version(server, expected_version, timeout)
        return server

    def _start(
        self,
        name,
        model_uri,
        http_port,
        grpc_port,
        env,
        timeout,
        runtime="torch",
        precision="fp32",
    ) -> LocalServer:
        http_port = http_port if http_port and port_is_free(http_port) else free_port()
        grpc_port = grpc_port if grpc_port and port_is_free(grpc_port) else free_port()
        records = self.records_file(name)
        extra = ("--poll-interval", str(LOCAL_POLL_SECONDS), "--record", str(records))
        server = spawn_model_server(
            self.dir.parent,
            name,
            model_uri,
            http_port=http_port,
            grpc_port=grpc_port,
            extra=(*extra, "--runtime", runtime, "--precision", precision),
            env=env,
            log_name=f"serve-{name}",
        )
        process = ServerState(pid=server.pid, log=server.log)
        self._save(server)
        log.info("starting the model server for %s on %s", name, server.url)
        try:
            wait_healthy(f"model server {name}", process, lambda: bool(server.status()), timeout)
        except StackError as error:
            self._state_file(name).unlink(missing_ok=True)  # no stale pid to signal later
            raise DeploymentError(str(error)) from error
        return server

    @staticmethod
    def _wait_for_version(server: LocalServer, version: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = server.status()
            if status and status.get("version") == str(version):
                log.info("%s serves version %s at %s", server.name, version, server.url)
                return
            if status and str(version) in status.get("failed_versions", {}):
                raise DeploymentError(
                    f"{server.name} could not load version {version}: "
                    f"{status['failed_versions'][str(version)]}"
                )
            if not pid_alive(server.pid):
                raise DeploymentError(f"the model server of {server.name} exited; see {server.log}")
            time.sleep(0.5)
        raise DeploymentError(
            f"{server.name} did not switch to version {version} within {timeout:.0f}s "
            f"(it reports {status}); log: {server.log}"
        )

    def stop(self, name: str) -> None:
        server = self.get(name)
        if server:
            stop_server(ServerState(pid=server.pid))
            self._state_file(name).unlink(missing_ok=True)

    def stop_all(self) -> None:
        for server in self.servers():
            self.stop(server.name)
