"""The MLflow server as infra/mlflow runs it, answering the cluster's Host header.

MLflow 3 refuses Host headers outside its allowed list (localhost and private IPs by
default) with 403, except on /health. A real ``mlflow server`` is started on loopback with
the Deployment's own arguments (only the store, the address and the port are local), and
called as a pod in the cluster calls it."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from components.local.processes import free_port, spawn_server, stop_server, wait_healthy

INFRA = Path(__file__).resolve().parents[2] / "infra"
CLUSTER_HOST = "mlflow.fod.svc.cluster.local:5000"  # MLFLOW_TRACKING_URI in infra/settings


def _deployment() -> dict:
    documents = yaml.safe_load_all((INFRA / "mlflow" / "mlflow.yaml").read_text())
    return next(d for d in documents if d["kind"] == "Deployment")


def _call(url: str, host: str, body: dict | None = None) -> int:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Host": host, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def cluster_mlflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("cluster-mlflow")
    container = _deployment()["spec"]["template"]["spec"]["containers"][0]
    port = free_port()
    local = {
        "--backend-store-uri": f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination": str(home / "artifacts"),
        "--host": "127.0.0.1",  # tests listen on loopback only
        "--port": str(port),
    }
    args = []
    for arg in container["args"]:
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}={local[flag]}" if flag in local else arg)
    assert container["command"] == ["mlflow", "server"]
    argv = [str(Path(sys.executable).with_name("mlflow")), "server", *args]
    server = spawn_server(home, "mlflow", argv, {"MLFLOW_ENABLE_TELEMETRY": "false"})
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return True
        except OSError:
            return False

    wait_healthy("MLflow (infra/mlflow's arguments)", server, healthy, timeout=120)
    yield url, container
    stop_server(server)


def test_api_calls_with_the_cluster_host_header_are_answered(cluster_mlflow):
    url, _ = cluster_mlflow
    create = f"{url}/api/2.0/mlflow/experiments/create"
    assert _call(create, CLUSTER_HOST, {"name": "from-a-pod"}) == 200
    assert _call(create, "mlflow.fod:5000", {"name": "short-name"}) == 200
    assert _call(create, "10.42.0.17:5000", {"name": "by-pod-ip"}) == 200  # kubelet, pods
    # the guard is on: a name that is not the Service's is refused
    assert _call(create, "mlflow.attacker.example.com", {"name": "rebinding"}) == 403


def test_the_readiness_probe_checks_what_clients_need(cluster_mlflow):
    """The probe calls the API with the cluster Host header, so a host list that refuses the
    cluster's clients keeps the pod unready; /health would pass regardless."""
    url, container = cluster_mlflow
    probe = container["readinessProbe"]["httpGet"]
    headers = {h["name"]: h["value"] for h in probe.get("httpHeaders", [])}
    assert headers.get("Host") == CLUSTER_HOST and probe["path"].startswith("/api/")
    assert _call(f"{url}{probe['path']}", headers["Host"]) == 200
    assert _call(f"{url}{probe['path']}", "mlflow.attacker.example.com") == 403
    assert _call(f"{url}/health", "mlflow.attacker.example.com") == 200  # exempt: useless
