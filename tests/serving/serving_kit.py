"""Helpers the serving tests import by name (a conftest's module name is shared by every
test folder's conftest, so importing from one depends on which was loaded last)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from components.local.processes import ServerState, free_port, wait_healthy
from components.local.servers import LocalServer, spawn_model_server


def start_server(home: Path, model: str, name: str, *extra: str) -> LocalServer:
    """``python -m components.serving`` (what ``fod serve`` runs) as its own process."""
    server = spawn_model_server(
        home, name, model, http_port=free_port(), grpc_port=free_port(), extra=extra
    )
    process = ServerState(pid=server.pid, log=server.log)
    wait_healthy(name, process, lambda: bool(server.status()), timeout=120)
    return server


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
