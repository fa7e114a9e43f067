"""The cluster side of deployment: the InferenceService in infra/, its storage URI in the
real S3, and clear errors where there is no cluster."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml

from components.deployment import (
    DeploymentError,
    apply_inference_service,
    champion_storage_uri,
    inference_service,
)
from components.registry import PromotionGates, register_model
from components.tracking import connect

INFRA = Path(__file__).resolve().parents[2] / "infra" / "serving"
EXAMPLE = dict(
    storage_uri="s3://fod/mlflow/1/models/m-0123456789abcdef/artifacts", model_version="1"
)


def test_checked_in_inference_service_is_what_the_sdk_renders():
    rendered = inference_service("fod-bottle", **EXAMPLE)
    assert yaml.safe_load((INFRA / "inferenceservice.yaml").read_text()) == rendered, (
        "infra/serving/inferenceservice.yaml is stale: run `fod deploy render --category "
        "bottle --model-version 1 --storage-uri ... --out infra/serving/inferenceservice.yaml`"
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
def test_storage_uri_points_at_the_registered_files_in_s3(settings, model_a):
    connect(settings.mlflow_uri, "stored")
    with mlflow.start_run() as run:
        pass
    version = register_model(
        model_a,
        run_id=run.info.run_id,
        category="stored",
        metrics={"image_auroc": 1.0},
        data_version="d",
        code_version="c",
        gates=PromotionGates(min_image_auroc=0.0),
    ).version
    uri = champion_storage_uri("fod-stored", version, settings.mlflow_artifacts)
    assert uri.startswith(f"s3://{settings.bucket}/mlflow/")
    prefix = uri.removeprefix(f"s3://{settings.bucket}/")
    listing = settings.s3_client().list_objects_v2(Bucket=settings.bucket, Prefix=prefix)
    keys = {item["Key"].removeprefix(prefix).lstrip("/") for item in listing["Contents"]}
    assert "MLmodel" in keys  # the MLflow model: KServe's /mnt/models, where fod serve looks
    assert any(k.startswith("artifacts/") and k.endswith("/fod.json") for k in keys), keys


def test_applying_without_a_cluster_is_a_clear_error(tmp_path, monkeypatch):
    manifest = inference_service("fod-bottle", **EXAMPLE)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(DeploymentError, match="no Kubernetes cluster configured"):
        apply_inference_service(manifest)


def test_applying_to_an_unreachable_cluster_is_a_clear_error(tmp_path, monkeypatch):
    from components.stack import free_port

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

    from components.deployment import kubernetes_name

    dns_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    assert kubernetes_name("fod-bottle") == "fod-bottle"  # valid names are kept
    renamed = kubernetes_name("fod-metal_nut")
    assert dns_1035.match(renamed) and renamed.startswith("fod-metal-nut-")
    assert renamed != kubernetes_name("fod-metal-nut")
    for name in ("fod-Screw", "fod-" + "x" * 80, "fod-__", "9parts"):
        assert dns_1035.match(kubernetes_name(name)) and len(kubernetes_name(name)) <= 63, name
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
