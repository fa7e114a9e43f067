"""docs/deploy.md against the manifests: every object, namespace, key and command the
runbook names is one that `kubectl kustomize` builds (or a Secret the runbook has the
user create and the manifests read), so the runbook cannot drift from infra/."""

from __future__ import annotations

import re

import pytest
from test_manifests import INFRA, ROOT, USER_SECRETS, build

RUNBOOK = (ROOT / "docs" / "deploy.md").read_text()
KINDS = {
    "deploy": "Deployment",
    "job": "Job",
    "cronjob": "CronJob",
    "inferenceservice": "InferenceService",
    "serviceaccount": "ServiceAccount",
    "secret": "Secret",
    "svc": "Service",
}
# the platform's own objects, which the runbook has the reader check, not build
PLATFORM = {("Deployment", "istio-system", "istiod")}


@pytest.fixture(scope="module")
def built() -> set[tuple[str, str, str]]:
    objects = build(INFRA) + build(INFRA / "multi-user") + build(INFRA / "serving")
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects}


def test_every_kustomization_the_runbook_applies_exists():
    applied = re.findall(r"kubectl apply -k ([\w./-]+)", RUNBOOK)
    assert applied
    assert all((ROOT / path / "kustomization.yaml").is_file() for path in applied), applied


def test_every_object_the_runbook_checks_is_built(built):
    created_by_the_reader = set(re.findall(r"create job --from=\S+ ([a-z][a-z0-9-]*)", RUNBOOK))
    pattern = re.compile(
        r"kubectl -n (?P<ns>[a-z][a-z0-9-]*) .*?\b(?P<kind>"
        + "|".join(KINDS)
        + r")[/ ](?P<name>[a-z][a-z0-9-]*)"
    )
    checked = 0
    for line in RUNBOOK.splitlines():
        for match in pattern.finditer(line):
            if match["name"] in created_by_the_reader or "create secret" in line:
                continue
            key = (KINDS[match["kind"]], match["ns"], match["name"])
            user_secret = key[0] == "Secret" and key[2] in USER_SECRETS
            assert key in built or user_secret or key in PLATFORM, line
            checked += 1
    assert checked >= 10
    for namespace, account in re.findall(r"system:serviceaccount:([a-z-]+):([a-z-]+)", RUNBOOK):
        assert ("ServiceAccount", namespace, account) in built


def test_the_secrets_the_reader_creates_are_the_ones_pods_read():
    """The runbook's `create secret` commands make exactly the Secrets the manifests read
    and do not create (which namespaces read them is test_manifests' check)."""
    import yaml

    created = set(re.findall(r"create secret generic (\S+)", RUNBOOK))
    assert created == USER_SECRETS
    manifests = yaml.safe_dump_all(build(INFRA))
    assert all(
        f"name: {name}" in manifests or f"secretName: {name}" in manifests for name in created
    )


def test_every_name_in_backticks_is_an_object_or_a_known_model_name(built):
    from components.deploy import kubernetes_name
    from pipelines.retrain import CLAIMS_EXPERIMENT  # an MLflow experiment, not an object

    names = {name for _, _, name in built} | USER_SECRETS | {CLAIMS_EXPERIMENT}
    models = {"fod-bottle", "fod-metal_nut", kubernetes_name("fod-metal_nut"), "fod-<category>"}
    mentioned = set(re.findall(r"`(fod-[a-z0-9_<>-]+)`", RUNBOOK))
    assert mentioned and not mentioned - names - models, mentioned - names - models


def test_settings_keys_and_schedule_match():
    objects = build(INFRA)
    keys = set()
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            keys |= set(obj["data"])
    named = set(re.findall(r"`((?:FOD|MLFLOW)_[A-Z0-9_]+)`", RUNBOOK))
    sources = "".join(p.read_text() for p in (ROOT / "components").glob("*.py"))
    sources += "".join(p.read_text() for p in (ROOT / "pipelines").glob("*.py"))
    assert named and all(key in keys or f'"{key}"' in sources for key in named), named
    cron = next(o for o in objects if o["kind"] == "CronJob")
    minute, hour = cron["spec"]["schedule"].split()[:2]
    assert f"{int(hour):02d}:{int(minute):02d}" in RUNBOOK


def test_the_runbooks_yaml_blocks_parse():
    import yaml

    blocks = re.findall(r"```yaml\n(.*?)```", RUNBOOK, flags=re.S)
    assert blocks and all(yaml.safe_load(block) for block in blocks)
