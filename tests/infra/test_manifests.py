"""infra/: every kustomization builds, every object validates offline against the
Kubernetes schemas (kubernetes-validate) or, for KServe's CRD, the SDK's generated
models; no secret values; pinned images; the Dockerfile copies what exists."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml
from manifests import INFRA, MODES, ROOT, build, index

KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = sorted(p.parent for p in INFRA.rglob("kustomization.yaml"))


@pytest.mark.parametrize(
    "directory", KUSTOMIZATIONS, ids=[str(p.relative_to(INFRA)) for p in KUSTOMIZATIONS]
)
def test_kustomization_builds_and_validates(directory):
    import kubernetes_validate

    from components.deploy import schema_errors

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
    objects = index(build(INFRA))
    assert {
        ("Namespace", "", "fod"),
        ("Deployment", "fod", "mlflow"),
        ("Deployment", "fod", "seaweedfs"),
        ("Job", "fod", "fod-bucket"),
        ("CronJob", "fod", "fod-retrain"),
        ("Role", "fod", "fod-deployer"),
        ("RoleBinding", "fod", "fod-deployer"),
        ("ServiceAccount", "fod", "fod-retrain"),
        ("ServiceAccount", "fod", "fod-s3"),
        ("ServiceAccount", "kubeflow", "fod-deployer"),
        ("ConfigMap", "fod", "fod-settings"),
        ("ConfigMap", "kubeflow", "fod-settings"),
    } <= set(objects)
    assert ("InferenceService", "fod", "fod-bottle") in index(build(INFRA / "serving"))
    assert objects["CronJob", "fod", "fod-retrain"]["spec"]["concurrencyPolicy"] == "Forbid"
    # The drift check: the nightly check's pod, hourly, with --on-drift, on the same settings.
    nightly, on_drift = (
        objects["CronJob", "fod", n] for n in ("fod-retrain", "fod-retrain-on-drift")
    )
    pod = on_drift["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert (
        args[: len(args) - 3]
        == nightly["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert args[-3:] == ["--on-drift", "--drift-window", "24h"]
    assert on_drift["spec"]["schedule"] != nightly["spec"]["schedule"]
    assert {"configMapRef": {"name": "fod-retrain"}} in pod["containers"][0]["envFrom"]
    assert objects["ConfigMap", "fod", "fod-settings"]["data"]["FOD_DECISION_RECORD"].startswith(
        "s3://"
    )


USER_SECRETS = {  # created by the user
    "fod-s3-credentials",
    "fod-seaweedfs-s3-config",
    "fod-git-credentials",
    "fod-review-oauth2",
}


def _references(pod_spec: dict) -> set[tuple[str, str]]:
    """The ConfigMaps and Secrets a pod reads: envFrom, env valueFrom, volumes."""
    refs = set()
    for container in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        for source in container.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in source:
                    refs.add((kind, source[key]["name"]))
        for env in container.get("env", []):
            value_from = env.get("valueFrom", {})
            for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if key in value_from:
                    refs.add((kind, value_from[key]["name"]))
    for volume in pod_spec.get("volumes", []):
        if "configMap" in volume:
            refs.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            refs.add(("Secret", volume["secret"]["secretName"]))
    return refs


def _pipeline_references(compiled: Path) -> set[tuple[str, str]]:
    platform = list(yaml.safe_load_all(compiled.read_text()))[1]
    refs = set()
    for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        refs |= {("ConfigMap", c["configMapName"]) for c in executor.get("configMapAsEnv", [])}
        refs |= {("Secret", c["secretName"]) for c in executor.get("secretAsEnv", [])}
        refs |= {("Secret", c["secretName"]) for c in executor.get("secretAsVolume", [])}
    return refs


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_configmap_secret_and_role_is_where_its_readers_run(mode):
    """Pods read ConfigMaps and Secrets from their own namespace only: the CronJob's, the
    Deployments', and the pipeline's steps (which run where KFP puts them: kubeflow for
    standalone KFP, the profile namespace for multi-user). The deploy step's account must
    be bound, from there, to the Role in the InferenceServices' namespace."""
    from pipelines.dag import COMPILED_YAML, DEPLOYER_TOKEN_SECRET
    from pipelines.schedule import COMPILED_YAML as CHECK_YAML

    pipeline_ns, serving_ns = MODES[mode]
    objects = index(build(ROOT / mode))
    present = {(kind, ns, name) for kind, ns, name in objects}

    def exists(kind: str, namespace: str, name: str) -> bool:
        return (kind, namespace, name) in present or (kind == "Secret" and name in USER_SECRETS)

    for (kind, namespace, name), obj in objects.items():
        pod = {
            "Deployment": lambda o: o["spec"]["template"]["spec"],
            "Job": lambda o: o["spec"]["template"]["spec"],
            "CronJob": lambda o: o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        }.get(kind)
        if pod is None:
            continue
        spec = pod(obj)
        missing = [r for r in _references(spec) if not exists(r[0], namespace, r[1])]
        assert not missing, f"{kind} {namespace}/{name} reads what is not there: {missing}"
        account = spec.get("serviceAccountName")
        assert account is None or ("ServiceAccount", namespace, account) in present, name
    for compiled in (COMPILED_YAML, CHECK_YAML):
        missing = [r for r in _pipeline_references(compiled) if not exists(r[0], pipeline_ns, r[1])]
        assert not missing, f"{compiled.name}: not in {pipeline_ns}: {missing}"
    token = objects["Secret", pipeline_ns, DEPLOYER_TOKEN_SECRET]
    assert token["type"] == "kubernetes.io/service-account-token"
    deployer = token["metadata"]["annotations"]["kubernetes.io/service-account.name"]
    assert ("ServiceAccount", pipeline_ns, deployer) in present
    binding = objects["RoleBinding", serving_ns, "fod-deployer"]
    assert {"kind": "ServiceAccount", "name": deployer, "namespace": pipeline_ns} in binding[
        "subjects"
    ]
    role = objects["Role", serving_ns, binding["roleRef"]["name"]]
    assert role["rules"] == [
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices"],
            "verbs": ["get", "create", "patch"],
        },
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
    ], "the deploy step may manage InferenceServices, read their Deployments, nothing more"


def test_the_cronjob_authenticates_to_kfp_with_a_projected_token():
    from kfp.client import KF_PIPELINES_SA_TOKEN_PATH

    for mode, name in itertools.product(MODES, ("fod-retrain", "fod-retrain-on-drift")):
        cron = index(build(ROOT / mode))["CronJob", "fod", name]
        spec = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        volume = next(v for v in spec["volumes"] if "projected" in v)
        token = volume["projected"]["sources"][0]["serviceAccountToken"]
        assert token["audience"] == "pipelines.kubeflow.org"
        mount = next(
            m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]
        )
        assert f"{mount['mountPath']}/{token['path']}" == KF_PIPELINES_SA_TOKEN_PATH
    multi = index(build(ROOT / "infra/multi-user"))
    assert multi["ConfigMap", "fod", "fod-retrain"]["data"]["FOD_KFP_NAMESPACE"] == "fod"
    binding = multi["RoleBinding", "fod", "fod-retrain-pipelines"]
    assert binding["roleRef"]["name"] == "kubeflow-pipelines-edit"
    assert ("Namespace", "", "fod") not in multi  # the Profile owns it


def test_the_review_page_is_reached_through_its_auth_proxy_only():
    """The page has no login: it listens on the pod's loopback (fod review's default host),
    and the Service reaches only the auth proxy, whose upstream is that loopback port."""
    objects = index(build(INFRA))
    pod = objects["Deployment", "fod", "fod-review"]["spec"]["template"]["spec"]
    review, proxy = (next(c for c in pod["containers"] if c["name"] == n)
                     for n in ("review", "auth-proxy"))  # fmt: skip
    assert review["command"] == ["fod", "review"] and "--host" not in review["args"]
    assert "ports" not in review
    port = (
        review["args"][review["args"].index("--port") + 1] if "--port" in review["args"] else "8090"
    )
    assert f"--upstream=http://127.0.0.1:{port}/" in proxy["args"]
    assert {"--pull", "--git-push"} <= set(review["args"])
    service = objects["Service", "fod", "fod-review"]["spec"]
    (target,) = [p["targetPort"] for p in service["ports"]]
    assert target in {p["name"] for p in proxy["ports"]}
    assert objects["Deployment", "fod", "fod-review"]["spec"]["replicas"] == 1


def test_mlflow_can_write_its_sqlite_file_and_has_one_writer():
    mlflow = index(build(INFRA))["Deployment", "fod", "mlflow"]["spec"]["template"]["spec"]
    uid = re.search(r"--uid (\d+)", (INFRA / "images" / "Dockerfile").read_text())[1]
    assert mlflow["securityContext"]["fsGroup"] == int(uid)
    assert mlflow["securityContext"]["runAsUser"] == int(uid)
    args = mlflow["containers"][0]["args"]
    if any(a.startswith("--backend-store-uri=sqlite") for a in args):
        assert "--workers=1" in args  # SQLite takes one writer


def test_no_secret_values_and_pinned_images():
    objects = build(INFRA) + build(INFRA / "serving") + build(ROOT / "infra/multi-user")
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert all(  # only token Secrets, which Kubernetes fills
        s["type"] == "kubernetes.io/service-account-token" and not s.get("data") for s in secrets
    ), "Secrets with values are created by the user"
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
    lines = dockerfile.splitlines()
    dependencies = next(i for i, line in enumerate(lines) if '".[weights,pipeline,export]"' in line)
    first_code = next(i for i, line in enumerate(lines) if line.startswith("COPY fod_core"))
    assert dependencies < first_code, "a code change must not rebuild the dependency layer"
