"""Rolling a model version out as a KServe InferenceService, and knowing when it is done.

``apply_inference_service`` creates or merge-patches the InferenceService as the deployer
identity; ``wait_until_ready`` polls until the *applied* spec serves. KServe's own status
cannot say that alone: its ``observedGeneration`` is a child's counter (the Knative
Service's or the predictor Deployment's, kserve/kserve#6081), and in RawDeployment mode
its Ready is the Deployment's ``Available``, true during a rolling update and while a new
pod crash-loops (KServe 0.15, kserve#4626). So each mode is read by what it really reports:

- Serverless (Knative): the predictor's ``latestReadyRevision`` moves on from the one before
  the change to the new ``latestCreatedRevision``, and traffic is split as the spec asks
  (a canary promote changes traffic only, no revision);
- RawDeployment (Standard): the ``<name>-predictor`` Deployment carries the applied model
  (its STORAGE_URI) and has rolled out: the Deployment controller saw its generation,
  every replica is updated and available, no old replica is left.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from components.errors import DeploymentError

log = logging.getLogger(__name__)

KSERVE_API = ("serving.kserve.io", "v1beta1", "inferenceservices")  # group, version, plural
# The deploy step's identity on a cluster: the token Secret of the ServiceAccount
# fod-deployer (it may get, create and patch InferenceServices and get Deployments, nothing
# more), mounted by the pipeline (pipelines/dag.py). The pod's own account does not deploy.
DEPLOYER_TOKEN_DIR = "/var/run/secrets/fod-deployer"
READY_TIMEOUT = 600.0
READY_POLL_SECONDS = 5.0
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
MODEL_CONTAINER = "kserve-container"


class ServingMode(str, Enum):
    SERVERLESS = "Serverless"  # Knative revisions and traffic
    RAW = "RawDeployment"  # a Deployment per component


# KServe 0.16 renamed the modes (Knative, Standard) and still accepts the old names.
MODE_NAMES = {
    "Serverless": ServingMode.SERVERLESS,
    "Knative": ServingMode.SERVERLESS,
    "RawDeployment": ServingMode.RAW,
    "Standard": ServingMode.RAW,
}


@dataclass
class Applied:
    """What the API server did with the InferenceService, and what the rollout must show."""

    action: str  # created | patched
    name: str
    namespace: str
    generation: int
    previous_revision: str | None = None  # Serverless: the latest revision before the change
    new_revision: bool = True  # Serverless: the change makes a revision (not traffic alone)
    storage_uri: str | None = None  # the model the predictor must carry
    canary_percent: int | None = None


@dataclass(frozen=True)
class KubeClient:
    api: object  # kubernetes.client.CustomObjectsApi
    identity: str  # whom it acts as, for error messages
    apps: object = None  # kubernetes.client.AppsV1Api: the RawDeployment predictor


def kubernetes_api(token_dir: str | Path | None = None) -> KubeClient:
    """Kubernetes API clients and a description of whom they act as.

    In order: the deployer's token (a pipeline's deploy step), ``KUBECONFIG`` or
    ``~/.kube/config`` (a workstation), the pod's own service account."""
    from kubernetes import client, config

    configuration = client.Configuration()
    token_dir = Path(token_dir or os.environ.get("FOD_DEPLOYER_TOKEN_DIR", DEPLOYER_TOKEN_DIR))
    try:
        if (token_dir / "token").is_file():
            host = os.environ["KUBERNETES_SERVICE_HOST"]
            host = f"[{host}]" if ":" in host else host
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            configuration.host = f"https://{host}:{port}"
            configuration.api_key = {"authorization": (token_dir / "token").read_text().strip()}
            configuration.api_key_prefix = {"authorization": "Bearer"}
            configuration.ssl_ca_cert = str(token_dir / "ca.crt")
            identity = f"the service account whose token is in {token_dir}"
        else:
            try:
                # KUBECONFIG read now (the kubernetes package reads it once, at import).
                config.load_kube_config(
                    config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
                )
                identity = "the current kubeconfig context's user"
            except (config.ConfigException, OSError, TypeError):
                config.load_incluster_config(client_configuration=configuration)
                identity = "this pod's service account"
    except Exception as error:  # no token, no kubeconfig, not in a pod
        raise DeploymentError(f"no Kubernetes cluster configured: {error}") from error
    api_client = client.ApiClient(configuration)
    return KubeClient(client.CustomObjectsApi(api_client), identity, client.AppsV1Api(api_client))


class AccessDenied(DeploymentError):
    """The deployer identity may not do what the step needs: no retry helps."""


class UnknownMode(DeploymentError):
    """A deployment mode whose rollout this step cannot follow (ModelMesh)."""


def predictor_status(service: dict) -> dict:
    return ((service.get("status") or {}).get("components") or {}).get("predictor") or {}


def api_error(
    error: Exception,
    what: str,
    namespace: str,
    name: str,
    identity: str,
    kind: str = "InferenceServices",
) -> DeploymentError:
    from kubernetes.client.rest import ApiException

    role = "fod-deployer (infra/base/rbac.yaml)"
    if isinstance(error, ApiException) and error.status in (401, 403):
        return AccessDenied(
            f"{identity} may not {what} {kind} in namespace {namespace} "
            f"({error.status} {error.reason}). The deploy step needs the Role {role} "
            "bound to its ServiceAccount; see docs/deploy.md."
        )
    single = kind.removesuffix("s")
    if isinstance(error, ApiException):
        reason = (error.body or str(error)).splitlines()[0][:300]
        return DeploymentError(f"could not {what} {single} {namespace}/{name}: {reason}")
    reason = str(error).splitlines()[0][:300]
    return DeploymentError(
        f"could not {what} {single} {namespace}/{name}: {type(error).__name__}: {reason}"
    )


def _storage_uri(spec: dict) -> str | None:
    for container in (spec.get("predictor") or {}).get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == "STORAGE_URI":
                return env.get("value")
    return None


def _without_canary(spec: dict | None) -> dict:
    spec = copy.deepcopy(spec or {})
    (spec.get("predictor") or {}).pop("canaryTrafficPercent", None)
    return spec


def apply_inference_service(manifest: dict, *, client: KubeClient | None = None) -> Applied:
    """Create the InferenceService, or merge-patch it so KServe rolls out the new spec.

    The patch sets ``canaryTrafficPercent`` to null when the manifest has none: a merge
    patch keeps fields it does not name, and an old canary split would stay."""
    import urllib3
    from kubernetes.client.rest import ApiException

    client = client or kubernetes_api()
    api, identity = client.api, client.identity
    name = manifest["metadata"]["name"]
    namespace = manifest["metadata"]["namespace"]
    group, version, plural = KSERVE_API
    failures = (ApiException, OSError, urllib3.exceptions.HTTPError)
    canary = (manifest["spec"].get("predictor") or {}).get("canaryTrafficPercent")
    storage_uri = _storage_uri(manifest["spec"])

    def get() -> dict | None:
        try:
            return api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise api_error(error, "get", namespace, name, identity) from error
        except failures as error:
            raise api_error(error, "get", namespace, name, identity) from error

    existing = get()
    if existing is None:
        try:
            created = api.create_namespaced_custom_object(
                group, version, namespace, plural, manifest
            )
            return Applied(
                "created", name, namespace, created["metadata"].get("generation", 1),
                storage_uri=storage_uri, canary_percent=canary,
            )  # fmt: skip
        except ApiException as error:
            if error.status != 409:  # 409: created meanwhile by someone else; patch it
                raise api_error(error, "create", namespace, name, identity) from error
        except failures as error:
            raise api_error(error, "create", namespace, name, identity) from error
        existing = get() or {}
    spec = copy.deepcopy(manifest["spec"])
    spec["predictor"].setdefault("canaryTrafficPercent", None)
    patch = {
        "metadata": {k: manifest["metadata"][k] for k in ("labels", "annotations")},
        "spec": spec,
    }
    for attempt in range(3):
        try:
            patched = api.patch_namespaced_custom_object(
                group, version, namespace, plural, name, patch
            )
            break
        except ApiException as error:
            if error.status != 409 or attempt == 2:  # 409: a concurrent writer; try again
                raise api_error(error, "patch", namespace, name, identity) from error
            time.sleep(1.0)
        except failures as error:
            raise api_error(error, "patch", namespace, name, identity) from error
    # Knative makes a revision when the predictor's template changes (spec or the labels
    # and annotations KServe passes down), not when only the canary share does.
    template_changed = _without_canary(existing.get("spec")) != _without_canary(
        patched.get("spec")
    ) or any(
        (existing.get("metadata") or {}).get(k) != (patched.get("metadata") or {}).get(k)
        for k in ("labels", "annotations")
    )
    return Applied(
        "patched",
        name,
        namespace,
        patched["metadata"].get("generation", 0),
        predictor_status(existing).get("latestCreatedRevision"),
        new_revision=template_changed,
        storage_uri=storage_uri,
        canary_percent=canary,
    )


def serving_mode(service: dict) -> ServingMode | None:
    """The mode KServe runs the InferenceService in: the controller's record in the status
    (it wins over the annotation once set), else the annotation; None while neither says
    (the cluster's default applies, and the controller has not reconciled yet)."""
    value = (service.get("status") or {}).get("deploymentMode") or (
        (service.get("metadata") or {}).get("annotations") or {}
    ).get(MODE_ANNOTATION)
    if value is None:
        return None
    if value not in MODE_NAMES:
        raise UnknownMode(
            f"InferenceService {service['metadata']['name']} runs in deployment mode {value}; "
            f"the deploy step knows {', '.join(MODE_NAMES)} (docs/deploy.md)"
        )
    return MODE_NAMES[value]


def _ready_condition(service: dict) -> tuple[bool, str]:
    conditions = {c.get("type"): c for c in (service.get("status") or {}).get("conditions") or []}
    ready = conditions.get("Ready", {})
    if ready.get("status") == "True":
        return True, "Ready"
    reason = f"{ready.get('reason') or 'no Ready condition yet'} {ready.get('message', '')}"
    return False, f"Ready is {ready.get('status', 'unknown')}: {reason.strip()}"


def _serverless_state(service: dict, applied: Applied) -> tuple[bool, str]:
    predictor = predictor_status(service)
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if not created:
        return False, "no revision created yet"
    if applied.new_revision and created == applied.previous_revision:
        return False, f"the new revision is not created yet (latest is still {created})"
    if ready != created:
        return False, f"revision {created} is not ready yet (ready: {ready or 'none'})"
    if traffic := predictor.get("traffic"):
        share = sum(t.get("percent") or 0 for t in traffic if t.get("revisionName") == created)
        # KServe gives a first revision all traffic, canary or not
        wanted = {100} if applied.canary_percent is None else {applied.canary_percent, 100}
        if share not in wanted:
            return False, f"revision {created} has {share}% of the traffic, not {max(wanted)}%"
    ok, why = _ready_condition(service)
    return ok, f"Ready (revision {created})" if ok else why


def _raw_state(service: dict, applied: Applied, deployment: dict | None) -> tuple[bool, str]:
    name = f"{applied.name}-predictor"
    if deployment is None:
        return False, f"Deployment {name} not created yet"
    template = deployment["spec"]["template"]["spec"]
    carried = _storage_uri({"predictor": {"containers": template.get("containers") or []}})
    if applied.storage_uri and carried != applied.storage_uri:
        return False, f"Deployment {name} does not carry the applied model yet"
    status = deployment.get("status") or {}
    generation = deployment["metadata"].get("generation", 0)
    if (status.get("observedGeneration") or 0) < generation:
        return False, f"the Deployment controller has not seen {name} generation {generation}"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("status") == "False":
            return False, f"{name}: {condition.get('reason')} {condition.get('message', '')}"
    replicas = deployment["spec"].get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    total, available = status.get("replicas") or 0, status.get("availableReplicas") or 0
    if updated < replicas:
        return False, f"{name}: {updated} of {replicas} replicas updated"
    if total > updated:
        return False, f"{name}: {total - updated} old replica(s) still running"
    if available < updated:
        return False, f"{name}: {available} of {updated} updated replicas available"
    ok, why = _ready_condition(service)
    return ok, f"Ready ({name} rolled out, {available} replica(s))" if ok else why


def rollout_state(
    service: dict, applied: Applied, deployment: dict | None = None
) -> tuple[bool, str]:
    """Whether the applied spec serves, and why not, by what the mode really reports.
    ``deployment``: the predictor Deployment (RawDeployment)."""
    mode = serving_mode(service)
    if mode is None:
        return False, "the controller has not reported the deployment mode yet"
    if mode is ServingMode.RAW:
        return _raw_state(service, applied, deployment)
    return _serverless_state(service, applied)


def predictor_deployment(client: KubeClient, applied: Applied) -> dict | None:
    """The RawDeployment predictor's Deployment (``<name>-predictor``; KServe before 0.16
    kept ``<name>-predictor-default`` for objects made by older versions); None if absent."""
    from kubernetes.client.rest import ApiException

    for name in (f"{applied.name}-predictor", f"{applied.name}-predictor-default"):
        try:  # as JSON: the SDK's model would refuse what it does not expect
            answer = client.apps.read_namespaced_deployment(
                name, applied.namespace, _preload_content=False
            )
            return json.loads(answer.data)
        except ApiException as error:
            if error.status != 404:
                raise api_error(
                    error, "get", applied.namespace, name, client.identity, "Deployments"
                ) from error
    return None


class NotReady(DeploymentError):
    """The applied spec did not become Ready in time; what the cluster showed last, so that
    the registry can be put back in line with what KServe still serves."""

    def __init__(self, message: str, *, applied: Applied, last_seen: dict | None, why: str,
                 timeout: float) -> None:  # fmt: skip
        super().__init__(message)
        self.applied, self.last_seen, self.why, self.timeout = applied, last_seen, why, timeout


def wait_until_ready(
    applied: Applied,
    *,
    client: KubeClient | None = None,
    timeout: float = READY_TIMEOUT,
    poll: float | None = None,
) -> dict:
    """Poll until the applied spec serves (``rollout_state``); NotReady on timeout.

    A timeout changes nothing in the cluster: KServe keeps routing to the last ready
    revision, and a RawDeployment keeps its old pods until the new ones are available."""
    client = client or kubernetes_api()
    group, version, plural = KSERVE_API
    deadline = time.monotonic() + timeout
    why, last_seen = "not polled", None
    while True:
        try:
            service = client.api.get_namespaced_custom_object(
                group, version, applied.namespace, plural, applied.name
            )
            last_seen = service
            deployment = None
            if serving_mode(service) is ServingMode.RAW:
                deployment = predictor_deployment(client, applied)
            ready, why = rollout_state(service, applied, deployment)
            if ready:
                return service
        except (AccessDenied, UnknownMode):
            raise  # no right to read it, or a mode this step cannot follow: no retry
        except DeploymentError as error:
            why = str(error)
        except Exception as error:  # a poll that fails is retried until the deadline
            why = str(api_error(error, "get", applied.namespace, applied.name, client.identity))
        if time.monotonic() >= deadline:
            revision = predictor_status(last_seen or {}).get("latestReadyRevision")
            serving = f" ({revision})" if revision else ""
            raise NotReady(
                f"InferenceService {applied.namespace}/{applied.name} was not Ready for "
                f"generation {applied.generation} within {timeout:g}s (last seen: {why}). "
                f"KServe keeps serving its last ready revision{serving}. Inspect it with "
                f"`kubectl -n {applied.namespace} describe inferenceservice {applied.name}`.",
                applied=applied,
                last_seen=last_seen,
                why=why,
                timeout=timeout,
            )
        time.sleep(READY_POLL_SECONDS if poll is None else poll)
