"""infra/: every kustomization builds, every object validates offline against the
Kubernetes schemas (kubernetes-validate) or, for KServe's CRD, the SDK's generated
models; no secret values; pinned images; the Dockerfile copies what exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = sorted(p.parent for p in INFRA.rglob("kustomization.yaml"))


def build(directory: Path) -> list[dict]:
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with its built-in kustomize) is not installed on this machine")
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.parametrize(
    "directory", KUSTOMIZATIONS, ids=[str(p.relative_to(INFRA)) for p in KUSTOMIZATIONS]
)
def test_kustomization_builds_and_validates(directory):
    import kubernetes_validate

    from components.deployment import schema_errors

    objects = build(directory)
    assert objects
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].startswith("serving.kserve.io/"):
            assert schema_errors(obj) == [], name
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{directory.name}: {name} is invalid: {error}")


def test_the_whole_deployment_holds_what_a_cluster_needs():
    kinds = {(o["kind"], o["metadata"]["name"]) for o in build(INFRA)}
    assert {
        ("Namespace", "fod"),
        ("Deployment", "mlflow"),
        ("Deployment", "seaweedfs"),
        ("CronJob", "fod-retrain"),
        ("Role", "fod-deployer"),
        ("RoleBinding", "fod-deployer"),
        ("ServiceAccount", "fod-pipeline"),
        ("ServiceAccount", "fod-s3"),
    } <= kinds
    assert ("InferenceService", "fod-bottle") in {
        (o["kind"], o["metadata"]["name"]) for o in build(INFRA / "serving")
    }
    cron = next(o for o in build(INFRA) if o["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # never two retrain checks at once


def test_no_secret_values_and_pinned_images():
    objects = build(INFRA) + build(INFRA / "serving")
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by the user"
    lines = [
        line
        for path in INFRA.rglob("*.yaml")
        for line in path.read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert not [
        line for line in lines if re.search(r"(SECRET|PASSWORD|TOKEN)\w*\s*[:=]\s*\S", line)
    ]
    images = re.findall(r"image:\s*(\S+)", yaml.safe_dump_all(objects))
    assert images and all(":" in i and not i.endswith(":latest") for i in images), images


def test_dockerfile_copies_what_the_repository_has():
    dockerfile = (INFRA / "images" / "Dockerfile").read_text()
    sources = [
        part
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
    ]
    assert sources and all((ROOT / s).exists() for s in sources), sources
    assert "VARIANT" in dockerfile and "whl/cpu" in dockerfile  # CPU and CUDA variants
