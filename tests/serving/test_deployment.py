"""The cluster side of deployment: the InferenceService in infra/, its storage URI in the
real S3, and clear errors where there is no cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from registered import register_version

from components.deploy import (
    RECORD_MOUNT,
    apply_inference_service,
    champion_storage_uri,
    inference_service,
)
from components.errors import DeploymentError

INFRA = Path(__file__).resolve().parents[2] / "infra" / "serving"
EXAMPLE = dict(
    storage_uri="s3://fod/mlflow/1/models/m-0123456789abcdef/artifacts",
    model_version="1",
    decision_record="s3://fod/records",
)


def test_checked_in_inference_service_is_what_the_sdk_renders():
    rendered = inference_service("fod-bottle", **EXAMPLE)
    assert yaml.safe_load((INFRA / "inferenceservice.yaml").read_text()) == rendered, (
        "infra/serving/inferenceservice.yaml is stale: run `fod deploy render --category "
        "bottle --model-version 1 --storage-uri ... --decision-record s3://fod/records "
        "--out infra/serving/inferenceservice.yaml`"
    )


def test_inference_service_serves_the_s3_model_on_the_pod_network():
    manifest = inference_service("fod-bottle", **EXAMPLE)
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    predictor = manifest["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor
    container = predictor["containers"][0]
    assert {"name": "STORAGE_URI", "value": EXAMPLE["storage_uri"]} in container["env"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "/mnt/models"
    assert args[args.index("--host") + 1] == "0.0.0.0"  # inside the pod only
    assert predictor["serviceAccountName"] == "fod-s3"


def test_canary_option_and_overlay():
    manifest = inference_service("fod-bottle", **EXAMPLE, canary_traffic_percent=10)
    assert manifest["spec"]["predictor"]["canaryTrafficPercent"] == 10
    with pytest.raises(ValueError, match=r"0\.\.100"):
        inference_service("fod-bottle", **EXAMPLE, canary_traffic_percent=120)
    overlay = yaml.safe_load((INFRA.parent / "serving-canary" / "kustomization.yaml").read_text())
    patch = overlay["patches"][0]
    assert patch["target"]["name"] == manifest["metadata"]["name"]
    assert yaml.safe_load(patch["patch"])[0]["path"] == "/spec/predictor/canaryTrafficPercent"
    base = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
    assert all((INFRA / resource).is_file() for resource in base["resources"])


@pytest.mark.slow
def test_the_serving_pods_data_path(settings, model_a, test_images, tmp_path):
    """What the pod does: KServe's storage initializer (the ``kserve-storage`` package) fetches
    the champion's storageUri from S3 with the credentials KServe injects, and the predictor
    container runs the InferenceService's own command line on that folder."""
    import os
    import sys
    import time
    import urllib.request

    from kserve_storage import Storage

    from components.local.processes import free_port, spawn_server, stop_server, wait_healthy
    from components.local.servers import LocalServer
    from components.serving.shipping import read_shipped

    version = register_version(settings, model_a, "stored")
    uri = champion_storage_uri("fod-stored", version, settings.mlflow_artifacts)
    assert uri.startswith(f"s3://{settings.bucket}/mlflow/")

    pod_env = {  # what KServe sets from the fod-s3 ServiceAccount's Secret and annotations
        "AWS_ACCESS_KEY_ID": settings.access_key,
        "AWS_SECRET_ACCESS_KEY": settings.secret_key,
        "AWS_ENDPOINT_URL": settings.s3_endpoint,
        "AWS_DEFAULT_REGION": settings.region,
        "S3_USE_HTTPS": "0",
    }
    mount = tmp_path / "mnt-models"
    saved = {key: os.environ.get(key) for key in pod_env}
    os.environ.update(pod_env)
    try:
        Storage.download(uri, str(mount))
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert (mount / "MLmodel").is_file()  # the MLflow model: where fod serve looks
    assert list(mount.rglob("fod.json")), sorted(p.name for p in mount.rglob("*"))

    shipped_to = f"s3://{settings.bucket}/pod-records"
    container = inference_service(
        "fod-stored", storage_uri=uri, model_version=version, decision_record=shipped_to
    )["spec"]["predictor"]["containers"][0]
    port = free_port()
    pod_disk = str(tmp_path / "pod-disk")  # the emptyDir of the decision record
    args = [
        str(mount) if a == "/mnt/models" else a.replace(RECORD_MOUNT, pod_disk)
        for a in container["args"]
    ]
    args[args.index("--host") + 1] = "127.0.0.1"  # tests listen on loopback only
    args[args.index("--http-port") + 1] = str(port)
    args += ["--ship-interval", "0.5"]  # not a minute
    command = [str(Path(sys.executable).with_name(container["command"][0])), *args]
    # the ConfigMap fod-settings and the Secret's S3 keys, as envFrom and env give them
    server = spawn_server(tmp_path, "predictor", command, settings.env() | {"HF_HUB_OFFLINE": "1"})
    ready_url = f"http://127.0.0.1:{port}" + container["readinessProbe"]["httpGet"]["path"]

    def ready() -> bool:
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_healthy("the predictor", server, ready, timeout=120)
        assert ready_url.endswith("/v2/models/fod-stored/ready")
        served = LocalServer("fod-stored", uri, port, 0, server.pid, server.log)
        answer = served.predict([test_images[0].read_bytes()])[0]
        deadline = time.monotonic() + 30
        while not (shipped := read_shipped(shipped_to, "fod-stored")):
            assert time.monotonic() < deadline, "the pod shipped no decision to S3"
            time.sleep(0.3)
        assert [r["score"] for r in shipped] == pytest.approx([answer["score"]])
        assert shipped[0]["model_version"] == str(version)
    finally:
        stop_server(server)


def test_the_pod_records_its_decisions_and_ships_them_to_s3():
    """With a decision record the pod keeps it on an emptyDir and ships it to S3 with the
    cluster settings and S3 keys; without one, none of that is in the spec."""
    predictor = inference_service("fod-bottle", **EXAMPLE)["spec"]["predictor"]
    container = predictor["containers"][0]
    args = container["args"]
    assert args[args.index("--ship-to") + 1] == EXAMPLE["decision_record"]
    (mount,) = container["volumeMounts"]
    assert args[args.index("--record") + 1].startswith(mount["mountPath"] + "/")
    assert [v["name"] for v in predictor["volumes"]] == [mount["name"]]
    assert "emptyDir" in predictor["volumes"][0]
    assert container["envFrom"] == [{"configMapRef": {"name": "fod-settings"}}]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]
               if "valueFrom" in e}  # fmt: skip
    assert secrets == {"AWS_ACCESS_KEY_ID": "fod-s3-credentials",
                       "AWS_SECRET_ACCESS_KEY": "fod-s3-credentials"}  # fmt: skip
    plain = inference_service("fod-bottle", **(EXAMPLE | {"decision_record": None}))
    predictor = plain["spec"]["predictor"]
    assert "--record" not in predictor["containers"][0]["args"] and "volumes" not in predictor


def test_applying_without_a_cluster_is_a_clear_error(tmp_path, monkeypatch):
    manifest = inference_service("fod-bottle", **EXAMPLE)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(DeploymentError, match="no Kubernetes cluster configured"):
        apply_inference_service(manifest)


def test_applying_to_an_unreachable_cluster_is_a_clear_error(tmp_path, monkeypatch):
    from components.local.processes import free_port

    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}
                ],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
                "users": [{"name": "u", "user": {}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(DeploymentError, match="fod/fod-bottle"):
        apply_inference_service(manifest := inference_service("fod-bottle", **EXAMPLE))
    assert manifest["metadata"]["namespace"] == "fod"


def test_every_mvtec_category_gets_a_valid_inference_service_name():
    """``fod-metal_nut`` (an MVTec category) is a valid model name but not a Kubernetes one;
    the object is renamed, the served model keeps its name, and names stay distinct."""
    import re

    from components.deploy import kubernetes_name

    dns_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    assert kubernetes_name("fod-bottle") == "fod-bottle"  # valid names are kept
    renamed = kubernetes_name("fod-metal_nut")
    assert dns_1035.match(renamed) and renamed.startswith("fod-metal-nut-")
    assert renamed != kubernetes_name("fod-metal-nut")
    odd = ["fod-Screw", "fod-" + "x" * 60, "fod-" + "x" * 80, "fod-" + "x" * 81, "fod-__", "9parts"]
    for name in odd:
        assert dns_1035.match(kubernetes_name(name)) and len(kubernetes_name(name)) <= 63, name
        assert kubernetes_name(name) == kubernetes_name(name)  # stable: no randomness
    mvtec = "bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile"
    names = [f"fod-{c}" for c in mvtec.split()] + odd + ["fod-metal-nut", "fod-Metal_Nut"]
    assert len({kubernetes_name(n) for n in names}) == len(names)  # no two collide
    manifest = inference_service("fod-metal_nut", **EXAMPLE)
    assert manifest["metadata"]["name"] == renamed
    args = manifest["spec"]["predictor"]["containers"][0]["args"]
    assert args[args.index("--name") + 1] == "fod-metal_nut"  # clients call the model's name


def test_the_cpu_limit_is_not_below_the_request():
    """KServe's default CPU limit is 1: a request of 2 without a limit is rejected."""
    resources = inference_service("fod-bottle", **EXAMPLE)["spec"]["predictor"]["containers"][0][
        "resources"
    ]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"] == "2"


def test_the_inference_service_selects_runtime_and_precision():
    def args(**selection) -> list[str]:
        manifest = inference_service("fod-bottle", **EXAMPLE, **selection)
        return manifest["spec"]["predictor"]["containers"][0]["args"]

    default = args()
    assert default[default.index("--runtime") + 1] == "torch"
    assert default[default.index("--precision") + 1] == "fp32"
    chosen = args(runtime="torch", precision="auto")
    assert chosen[chosen.index("--precision") + 1] == "auto"
