"""Deploy targets for the champion: a local model server, or a KServe InferenceService.

On a cluster, ``inference_service`` builds the InferenceService with the KServe SDK's
``V1beta1InferenceService``: the serving image runs ``fod serve`` on the model that
KServe's storage initializer downloads from the MLflow artifact location in S3 into
/mnt/models; ``canary_traffic_percent`` rolls a new version out to part of the traffic.
``kserve_rollout`` applies it as the deployer identity and follows the rollout, and
``deploy_champion`` tags the registry version ``deployed`` only once it serves. When it
does not become Ready, KServe keeps serving the previous version and the champion alias,
which registration had already moved, goes back to that version (``served_version``).
"""

from __future__ import annotations

import logging
from enum import Enum

from components.errors import DeploymentError
from components.kserve_rollout import (
    READY_TIMEOUT,
    NotReady,
    apply_inference_service,
    kubernetes_api,
    predictor_status,
    wait_until_ready,
)
from components.local.servers import LocalServing

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "fod"  # of the InferenceService (infra/base creates it)
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri
S3_SERVICE_ACCOUNT = "fod-s3"  # carries the S3 secret reference (infra/serving)
RECORD_MOUNT = "/var/lib/fod"  # the pod's local decision record, shipped to S3 from there
POD_MAX_RECORDS = 20_000  # the local record is a buffer once shipped: keep it small


class DeployTarget(str, Enum):
    LOCAL = "local"  # a model server on this machine's loopback
    KSERVE = "kserve"  # an InferenceService in the current Kubernetes context
    NONE = "none"


# -- cluster ----------------------------------------------------------------------------
def kubernetes_name(name: str) -> str:
    """A DNS-1035 label for a Kubernetes object named after a model (``fod-metal_nut`` is a
    valid MLflow name and MVTec category, not a valid InferenceService name). Names that
    had to change get a short hash of the original, so two models never share one."""
    import hashlib
    import re

    slug = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", name.lower())).strip("-")
    if not slug or not slug[0].isalpha():
        slug = f"m-{slug}".rstrip("-")
    if slug == name and len(slug) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{slug[: 63 - 7].rstrip('-')}-{digest}"


def inference_service(
    name: str,
    *,
    storage_uri: str,
    model_version: str,
    namespace: str = DEFAULT_NAMESPACE,
    image: str | None = None,
    canary_traffic_percent: int | None = None,
    service_account: str = S3_SERVICE_ACCOUNT,
    min_replicas: int = 1,
    max_replicas: int = 3,
    cpu: str = "2",
    memory: str = "4Gi",
    decision_record: str | None = None,
    runtime: str = "torch",
    precision: str = "fp32",
) -> dict:
    """The InferenceService for one model version, as a plain dict (YAML-ready). It serves
    the model as ``name``; the object's own name is `kubernetes_name` of it.

    ``runtime``: torch, onnx or openvino (the version's export, which the pipeline checked
    for parity before registering it; a version whose export failed is refused at load).
    ``precision`` (torch): fp32, bf16, or auto (bf16 where the node's CPU or GPU has it and
    the version passed its bf16 check).

    ``decision_record`` (s3://bucket/prefix): every decision is recorded in the pod and
    shipped there as Parquet, where ``fod monitor`` and the review page read it; the pod
    gets the cluster settings and S3 keys for that."""
    from components.serving.kserve_model import import_kserve

    kserve = import_kserve()
    from kubernetes import client as k8s

    from components.settings import (
        CLUSTER_CONFIG_MAP,
        CLUSTER_SECRET,
        CLUSTER_SECRET_KEYS,
        images,
    )

    image = image or images().cpu
    recording = {}
    if decision_record:
        recording = dict(
            args=[
                "--record", f"{RECORD_MOUNT}/decisions.sqlite", "--ship-to", decision_record,
                "--max-records", str(POD_MAX_RECORDS),
            ],
            env_from=[
                k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(CLUSTER_CONFIG_MAP))
            ],
            env=[
                k8s.V1EnvVar(
                    name=key,
                    value_from=k8s.V1EnvVarSource(
                        secret_key_ref=k8s.V1SecretKeySelector(key=key, name=CLUSTER_SECRET)
                    ),
                )
                for key in CLUSTER_SECRET_KEYS
            ],
            volume_mounts=[k8s.V1VolumeMount(name="decision-record", mount_path=RECORD_MOUNT)],
            volumes=[
                k8s.V1Volume(
                    name="decision-record",
                    empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="4Gi"),
                )
            ],
        )  # fmt: skip
    if canary_traffic_percent is not None and not 0 <= canary_traffic_percent <= 100:
        raise ValueError(f"canary_traffic_percent {canary_traffic_percent} is not in 0..100")
    container = k8s.V1Container(
        name="kserve-container",
        image=image,
        command=["fod"],
        args=[
            "serve",
            "--model",
            MODEL_MOUNT,
            "--name",
            name,
            "--model-version",
            str(model_version),
            "--host",
            "0.0.0.0",  # inside the pod; KServe routes to it
            "--http-port",
            "8080",
            "--no-grpc",  # KServe exposes one port per container
            "--poll-interval",
            "0",  # a new version is a new revision, rolled out by KServe
            "--runtime",
            runtime,
            "--precision",
            precision,
            *recording.get("args", []),
        ],
        env_from=recording.get("env_from"),
        env=[
            k8s.V1EnvVar(name="STORAGE_URI", value=storage_uri),
            k8s.V1EnvVar(name="HF_HUB_OFFLINE", value="1"),
            *recording.get("env", []),
        ],
        volume_mounts=recording.get("volume_mounts"),
        ports=[k8s.V1ContainerPort(container_port=8080, protocol="TCP")],
        readiness_probe=k8s.V1Probe(
            http_get=k8s.V1HTTPGetAction(path=f"/v2/models/{name}/ready", port=8080),
            period_seconds=5,
        ),
        # A CPU limit as high as the request: without one KServe applies its default
        # limit (1 CPU), below the request, and the pod is rejected.
        resources=k8s.V1ResourceRequirements(
            requests={"cpu": cpu, "memory": memory}, limits={"cpu": cpu, "memory": memory}
        ),
    )
    service = kserve.V1beta1InferenceService(
        api_version=kserve.constants.KSERVE_V1BETA1,
        kind=kserve.constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=k8s.V1ObjectMeta(
            name=kubernetes_name(name),
            namespace=namespace,
            labels={
                "app.kubernetes.io/part-of": "fod-pipeline",
                "fod/model": kubernetes_name(name),
            },
            annotations={"fod/model-version": str(model_version), "fod/storage-uri": storage_uri},
        ),
        spec=kserve.V1beta1InferenceServiceSpec(
            predictor=kserve.V1beta1PredictorSpec(
                service_account_name=service_account,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                canary_traffic_percent=canary_traffic_percent,
                containers=[container],
                volumes=recording.get("volumes"),
            )
        ),
    )
    return k8s.ApiClient().sanitize_for_serialization(service)


def champion_storage_uri(name: str, version: str, artifacts_root: str) -> str:
    """Where the registered version's files are in S3, for KServe's storage initializer.

    An MLflow server that proxies artifacts answers ``mlflow-artifacts:/<path>``; that path
    lies under the server's ``--artifacts-destination`` (``artifacts_root``)."""
    from mlflow import MlflowClient

    uri = MlflowClient().get_model_version_download_uri(name, str(version))
    if uri.startswith("mlflow-artifacts:"):
        uri = f"{artifacts_root.rstrip('/')}/{uri.split(':', 1)[1].lstrip('/')}"
    return uri


def served_version(versions, service: dict | None) -> str | None:
    """The registry version KServe still serves after a rollout that did not become Ready.

    ``versions``: (version, tags) of the registered model. Only a Ready rollout is tagged
    ``deployed`` ("kserve <time> <revision>"), and a rollout that is not Ready leaves the
    traffic where it was. So it is the version whose tag names the predictor's latest ready
    revision (Serverless; the latest such tag, as a recreated InferenceService reuses
    revision names), or, where the status names no revision (RawDeployment), the version
    last tagged deployed by kserve. None: nothing this registry deployed is known to serve.
    """
    deployed = []
    for version, tags in versions:
        stamp = (tags or {}).get("deployed", "").split()
        if len(stamp) >= 2 and stamp[0] == DeployTarget.KSERVE.value:
            revision = stamp[2] if len(stamp) > 2 else None
            deployed.append((stamp[1], int(version), str(version), revision))
    ready_revision = predictor_status(service or {}).get("latestReadyRevision")
    if ready_revision:
        deployed = [d for d in deployed if d[3] == ready_revision]
    return max(deployed)[2] if deployed else None


def _registry_follows_cluster(name: str, version: str, error: NotReady) -> DeploymentError:
    """After ``version`` did not become Ready: give the champion alias back to the version
    KServe still serves (only when the alias is on ``version``: a concurrent promotion or a
    by-hand deploy of another version is left alone), tag ``version`` ``deploy_failed``
    with the reason, and say what is served, where the alias is and why."""
    from datetime import UTC, datetime

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.registry import CHAMPION, champion_version

    version = str(version)
    revision = predictor_status(error.last_seen or {}).get("latestReadyRevision")
    why = f"not Ready within {error.timeout:g}s (last seen: {error.why})"
    head = (
        f"{name} v{version} was not deployed: InferenceService {error.applied.namespace}/"
        f"{error.applied.name} was not Ready for generation {error.applied.generation} within "
        f"{error.timeout:g}s (last seen: {error.why})."
    )
    inspect = (
        f"Inspect it with `kubectl -n {error.applied.namespace} describe inferenceservice "
        f"{error.applied.name}`."
    )
    client = MlflowClient()
    try:
        served = None  # an InferenceService this step created served nothing before
        if error.applied.action != "created":
            versions = client.search_model_versions(f"name='{name}'")
            served = served_version([(v.version, v.tags) for v in versions], error.last_seen)
        alias = champion_version(client, name)
        moved = alias == version and served is not None and served != version
        if moved:
            client.set_registered_model_alias(name, CHAMPION, served)
            where = f"the champion alias was moved back from v{version} to v{served}"
        elif alias == version:
            where = f"the champion alias stays on v{version}"
        elif alias is None:
            where = "there is no champion alias"
        else:
            where = f"the champion alias points at v{alias}, not at v{version}: left as it is"
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        note = f"; the champion alias went back to v{served}" if moved else ""
        client.set_model_version_tag(
            name, version, "deploy_failed", f"kserve {stamp}: {why}{note}"[:5000]
        )
    except MlflowException as failure:
        return DeploymentError(
            f"{head} The registry could not be updated ({failure}): the champion alias may "
            f"still name v{version}, which KServe does not serve. {inspect}"
        )
    if served:
        what = f"v{served} is served (revision {revision})" if revision else f"v{served} is served"
    else:
        what = "no version is known to be served (none is tagged deployed on a ready revision)"
    return DeploymentError(
        f"{head} Now {what}; {where}. v{version} is tagged deploy_failed with this reason. "
        f"{inspect}"
    )


def deploy_champion(
    name: str,
    version: str,
    target: DeployTarget,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    canary_traffic_percent: int | None = None,
    http_port: int = 8080,
    grpc_port: int = 8081,
    env: dict | None = None,
    ready_timeout: float = READY_TIMEOUT,
    runtime: str = "torch",
    precision: str = "fp32",
) -> dict:
    """The pipeline's deploy step: make the served model the given champion version.

    The version gets the tag ``deployed`` (target, time and revision) only once it is
    served: the local server reports it, or the InferenceService is Ready for the applied
    spec. A retrain check can so tell a champion whose deployment failed from a served one.

    An InferenceService that is not Ready in time rolls the registry back, not the cluster:
    KServe already keeps serving the last ready revision, and promotion (which moved the
    alias before this step) cannot wait for Ready because the local target follows the
    alias. So the alias goes back to the served version and the new one is tagged
    ``deploy_failed`` (``_registry_follows_cluster``)."""
    if target is DeployTarget.NONE:
        return {"target": target.value, "deployed": False}
    if target is DeployTarget.LOCAL:
        server = LocalServing().deploy(
            name,
            version,
            http_port=http_port,
            grpc_port=grpc_port,
            env=env,
            runtime=runtime,
            precision=precision,
        )
        result = {"target": target.value, "deployed": True, "url": server.url, "version": version}
    else:
        result = _deploy_inference_service(
            name, version, namespace, canary_traffic_percent, ready_timeout, runtime, precision
        )
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    stamp = f"{target.value} {datetime.now(UTC).isoformat(timespec='seconds')}"
    if result.get("revision"):
        stamp += f" {result['revision']}"
    client = MlflowClient()
    client.set_model_version_tag(name, str(version), "deployed", stamp)
    if "deploy_failed" in (client.get_model_version(name, str(version)).tags or {}):
        client.delete_model_version_tag(name, str(version), "deploy_failed")  # a past attempt
    return result


def _deploy_inference_service(
    name: str,
    version: str,
    namespace: str,
    canary_traffic_percent: int | None,
    ready_timeout: float,
    runtime: str = "torch",
    precision: str = "fp32",
) -> dict:
    """Apply the version's InferenceService and wait until it is Ready."""
    from components.settings import load_settings, shipped_record

    manifest = inference_service(
        name,
        storage_uri=champion_storage_uri(name, version, load_settings().mlflow_artifacts),
        model_version=version,
        namespace=namespace,
        canary_traffic_percent=canary_traffic_percent,
        decision_record=shipped_record(),
        runtime=runtime,
        precision=precision,
    )
    client = kubernetes_api()
    applied = apply_inference_service(manifest, client=client)
    log.info("%s InferenceService %s/%s; waiting until it is Ready", applied.action,
             namespace, applied.name)  # fmt: skip
    try:
        service = wait_until_ready(applied, client=client, timeout=ready_timeout)
    except NotReady as error:
        raise _registry_follows_cluster(name, version, error) from error
    predictor = predictor_status(service)
    return {
        "target": DeployTarget.KSERVE.value,
        "deployed": True,
        "action": applied.action,
        "name": applied.name,
        "version": version,
        "revision": predictor.get("latestReadyRevision", ""),
        "url": (service.get("status") or {}).get("url", ""),
    }


def schema_errors(value, type_name: str = "V1beta1InferenceService", path: str = "") -> list[str]:
    """Fields of a manifest that the KServe/Kubernetes SDK models (generated from the CRD
    and Kubernetes OpenAPI schemas) do not define, or of the wrong kind; [] when valid."""
    import re

    from components.serving.kserve_model import import_kserve

    kserve = import_kserve()
    from kubernetes.client import models as k8s_models

    if value is None:
        return []
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path or '/'}: expected a list"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, match[1], f"{path}[{i}]")]
    if match := re.fullmatch(r"dict\((\w+), (.+)\)", type_name):
        if not isinstance(value, dict):
            return [f"{path or '/'}: expected a mapping"]
        return [e for k, v in value.items() for e in schema_errors(v, match[2], f"{path}.{k}")]
    model = getattr(kserve.models, type_name, None) or getattr(k8s_models, type_name, None)
    if model is None:  # str, int, bool, object, datetime: leaves
        scalars = {"str": str, "int": int, "bool": bool, "float": (int, float)}
        expected = scalars.get(type_name)
        if expected and not isinstance(value, expected):
            return [f"{path}: expected {type_name}, got {type(value).__name__}"]
        return []
    if not isinstance(value, dict):
        return [f"{path or '/'}: expected an object ({type_name})"]
    fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors += schema_errors(item, model.openapi_types[fields[key]], f"{path}.{key}")
    return errors
