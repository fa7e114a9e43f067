"""A small HTTP server that answers the Kubernetes API paths of KServe's InferenceService
CRD, for the tests of the deploy step.

No real Kubernetes API server can be installed on this machine (no container runtime, and
kind, k3s or envtest binaries cannot be fetched), so this one plays its part on loopback:
GET, POST and merge-PATCH on ``/apis/serving.kserve.io/v1beta1/namespaces/NS/
inferenceservices[/NAME]``, GET on the predictor's ``/apis/apps/v1/.../deployments/NAME``,
a bearer token check, 401/403/404/409/415/422 answers in the API server's ``Status`` form, a
``generation`` that grows with each spec change, and a controller that reports status *as
KServe 0.15 does* in each mode (``kserve_rollout`` says why that matters):

- both: the status shows the previous state for some polls after a change (the controller
  has not reconciled yet); ``observedGeneration`` is copied from a child, whose counter is
  not the InferenceService's (kserve/kserve#6081); ``deploymentMode`` is recorded;
- Serverless: a change of the predictor's template makes a new revision, which becomes
  ready some polls later (or never); a change of the canary share alone moves traffic and
  makes no revision;
- RawDeployment: no revisions; a ``<name>-predictor`` Deployment with its own generation
  (an HPA that rescaled it raised it), replicas and conditions, rolled as Kubernetes rolls
  (the new pod surges beside the old one, which goes once the new one is available); the
  InferenceService's Ready is the Deployment's Available, true all the while, also while
  the new pod crash-loops.

Every request body is judged by the
SDKs, not by the product's code: it is deserialised into the KServe SDK's
``V1beta1InferenceService`` (generated from the CRD's OpenAPI schema; its Kubernetes
fields by the kubernetes package's own deserialiser) and serialised back, and anything the
SDK refuses, drops or reads differently is an error (``sdk_errors``).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from json_api import serve_json

DEPLOYMENT = re.compile(
    r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/?]+)/?(?:\?.*)?$"
)
PATH = re.compile(
    r"^/apis/serving\.kserve\.io/v1beta1/namespaces/(?P<ns>[^/]+)/inferenceservices"
    r"(?:/(?P<name>[^/?]+))?/?(?:\?.*)?$"
)


def merge_patch(target, patch):
    """RFC 7386: null deletes, objects merge, everything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def revision(name: str, number: int) -> str:
    return f"{name}-predictor-{number:05d}"


def _template(obj: dict) -> tuple:
    """What Knative and the Deployment are made from: the predictor without its canary
    share, and the labels and annotations KServe passes down."""
    predictor = {k: v for k, v in obj["spec"]["predictor"].items() if k != "canaryTrafficPercent"}
    meta = obj["metadata"]
    return json.dumps([predictor, meta.get("labels"), meta.get("annotations")], sort_keys=True)


@dataclass
class FakeKubeApi:
    token: str = "deployer-token"
    forbidden: set[str] = field(default_factory=set)  # verbs (deployments: "get-deployments")
    conflicts_on_create: int = 0  # 409 AlreadyExists (someone created it meanwhile)
    conflicts_on_patch: int = 0  # 409 Conflict, then success
    polls_until_ready: int = 3  # GETs after a change before the new state serves
    never_ready: bool = False  # the new revision / the new pod never becomes ready
    mode: str = "Serverless"  # or RawDeployment (its status.deploymentMode)
    hpa_scalings: int = 0  # RawDeployment: how often an HPA rescaled the Deployment
    objects: dict = field(default_factory=dict)
    deployments: dict = field(default_factory=dict)  # RawDeployment: key -> Deployment
    requests: list = field(default_factory=list)
    invalid_bodies: list = field(default_factory=list)
    _knative: dict = field(default_factory=dict)  # Serverless: key -> revisions, traffic
    _rollout: dict = field(default_factory=dict)  # key -> the change being reconciled
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- the controller ----------------------------------------------------------------
    def _changed(self, key, before: dict | None) -> None:
        obj = self.objects[key]
        self._rollout[key] = {
            "left": self.polls_until_ready,
            "template": before is None or _template(before) != _template(obj),
            "started": False,
        }

    def _conditions(self, ready: bool, reason: str = "") -> list[dict]:
        return [{"type": "Ready", "status": "True" if ready else "False", "reason": reason}]

    def _reconcile(self, key) -> None:
        """One controller step, taken at each GET: stale first, then the change."""
        rollout = self._rollout.get(key)
        if rollout is None:
            return
        children = self._knative if self.mode == "Serverless" else self.deployments
        stale = key in children and rollout["left"] > self.polls_until_ready // 2
        rollout["left"] = max(rollout["left"] - 1, 0)
        if stale:
            return
        if self.mode == "Serverless":
            self._reconcile_knative(key, rollout)
        else:
            self._reconcile_deployment(key, rollout)

    def _reconcile_knative(self, key, rollout) -> None:
        obj = self.objects[key]
        state = self._knative.setdefault(key, {"revisions": [], "ready": None, "generation": 2})
        if rollout["template"] and not rollout["started"]:
            state["revisions"].append(revision(key[1], len(state["revisions"]) + 1))
            state["generation"] += 1  # the Knative Service's own counter
        rollout["started"] = True
        latest = state["revisions"][-1]
        if state["ready"] != latest and (self.never_ready or rollout["left"] > 0):
            return  # the new revision is starting (or never will)
        state["ready"] = latest
        canary = obj["spec"]["predictor"].get("canaryTrafficPercent")
        previous = state["revisions"][-2] if len(state["revisions"]) > 1 else None
        if canary is None or previous is None:
            state["traffic"] = [{"revisionName": latest, "latestRevision": True, "percent": 100}]
        else:
            state["traffic"] = [
                {"revisionName": latest, "latestRevision": True, "percent": canary},
                {"revisionName": previous, "latestRevision": False, "percent": 100 - canary},
            ]
        del self._rollout[key]

    def _reconcile_deployment(self, key, rollout) -> None:
        obj = self.objects[key]
        containers = copy.deepcopy(obj["spec"]["predictor"]["containers"])
        deployment = self.deployments.get(key)
        if deployment is None:  # created: its generation counts the HPA's rescaling too
            deployment = self.deployments[key] = {
                "metadata": {
                    "name": f"{key[1]}-predictor",
                    "namespace": key[0],
                    "generation": 1 + self.hpa_scalings,
                },
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": f"isvc.{key[1]}-predictor"}},
                    "template": {
                        "metadata": {"labels": {"app": f"isvc.{key[1]}-predictor"}},
                        "spec": {"containers": containers},
                    },
                },
                "status": {
                    "observedGeneration": 1 + self.hpa_scalings,
                    "replicas": 1,
                    "updatedReplicas": 1,
                    "availableReplicas": 0,
                },
            }
            rollout["started"] = True
        if rollout["template"] and not rollout["started"]:
            deployment["metadata"]["generation"] += 1
            deployment["spec"]["template"]["spec"]["containers"] = containers
            deployment["status"] = {  # the new pod surges beside the old, available one
                "observedGeneration": deployment["metadata"]["generation"],
                "replicas": 2, "updatedReplicas": 1, "availableReplicas": 1,
            }  # fmt: skip
            rollout["started"] = True
        if self.never_ready or rollout["left"] > 0:
            return  # the new pod is starting (or crash-loops)
        deployment["status"] |= {"replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
        del self._rollout[key]

    def _status(self, key) -> dict:
        name, namespace = key[1], key[0]
        status = {"deploymentMode": self.mode, "url": f"http://{name}.{namespace}.example.com"}
        if self.mode == "Serverless":
            state = self._knative.get(key)
            if state is None or not state["revisions"]:
                return status | {"conditions": self._conditions(False, "RevisionMissing")}
            latest, ready = state["revisions"][-1], state["ready"]
            predictor = {"latestCreatedRevision": latest}
            if ready:
                predictor |= {"latestReadyRevision": ready, "traffic": state.get("traffic", [])}
            status["components"] = {"predictor": predictor}
            status["observedGeneration"] = state["generation"]  # the Knative Service's
            ok = ready == latest
            return status | {"conditions": self._conditions(ok, "" if ok else "RevisionMissing")}
        deployment = self.deployments.get(key)
        if deployment is None:
            return status | {"conditions": self._conditions(False, "PredictorNotCreated")}
        status["observedGeneration"] = deployment["status"]["observedGeneration"]  # its own
        available = deployment["status"]["availableReplicas"] > 0  # Available: min replicas up
        status["components"] = {"predictor": {"url": f"http://{name}-predictor.{namespace}"}}
        return status | {"conditions": self._conditions(available, "MinimumReplicasUnavailable")}

    def _observe(self, key) -> dict:
        self._reconcile(key)
        self.objects[key]["status"] = self._status(key)
        return self.objects[key]

    # -- the API -----------------------------------------------------------------------
    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        self.requests.append((method, path))
        if headers.get("Authorization") != f"Bearer {self.token}":
            return _status_body(401, "Unauthorized", "invalid bearer token")
        if (match := DEPLOYMENT.match(path)) and method == "GET":
            return self._get_deployment(match["ns"], match["name"])
        match = PATH.match(path)
        if not match:
            return _status_body(404, "NotFound", f"no route {path}")
        namespace, name = match["ns"], match["name"]
        verb = {"GET": "get", "POST": "create", "PATCH": "patch"}.get(method, method.lower())
        if verb in self.forbidden:
            return _status_body(
                403,
                "Forbidden",
                f'inferenceservices.serving.kserve.io is forbidden: User "system:serviceaccount:'
                f'kubeflow:pipeline-runner" cannot {verb} resource "inferenceservices" in API '
                f'group "serving.kserve.io" in the namespace "{namespace}"',
            )
        with self._lock:
            if method == "GET" and name:
                if (namespace, name) not in self.objects:
                    return _status_body(404, "NotFound", f'inferenceservices "{name}" not found')
                return 200, copy.deepcopy(self._observe((namespace, name)))
            payload = json.loads(body or b"{}")
            if method == "POST" and not name:
                return self._create(namespace, payload)
            if method == "PATCH" and name:
                if headers.get("Content-Type") != "application/merge-patch+json":
                    return _status_body(415, "UnsupportedMediaType", headers.get("Content-Type"))
                return self._patch(namespace, name, payload)
        return _status_body(405, "MethodNotAllowed", method)

    def _get_deployment(self, namespace: str, name: str) -> tuple[int, dict]:
        if "get-deployments" in self.forbidden:
            return _status_body(
                403, "Forbidden",
                f'deployments.apps "{name}" is forbidden: User "system:serviceaccount:kubeflow:'
                f'fod-deployer" cannot get resource "deployments" in API group "apps" in the '
                f'namespace "{namespace}"',
            )  # fmt: skip
        with self._lock:
            for (ns, isvc), deployment in self.deployments.items():
                if ns == namespace and deployment["metadata"]["name"] == name:
                    self._reconcile((ns, isvc))
                    return 200, {"apiVersion": "apps/v1", "kind": "Deployment"} | copy.deepcopy(
                        deployment
                    )
        return _status_body(404, "NotFound", f'deployments.apps "{name}" not found')

    def _validate(self, obj: dict) -> list[str]:
        errors = sdk_errors({k: v for k, v in obj.items() if k != "status"})
        if obj.get("kind") != "InferenceService" or not obj.get("metadata", {}).get("name"):
            errors.append("kind InferenceService with metadata.name expected")
        self.invalid_bodies += errors
        return errors

    def _create(self, namespace: str, payload: dict) -> tuple[int, dict]:
        if errors := self._validate(payload):
            return _status_body(422, "Invalid", "; ".join(errors))
        key = (namespace, payload["metadata"]["name"])
        if self.conflicts_on_create > 0:
            self.conflicts_on_create -= 1
            if key not in self.objects:  # another writer got there first
                self._store(key, copy.deepcopy(payload))
            return _status_body(409, "AlreadyExists", f"{key[1]} already exists")
        if key in self.objects:
            return _status_body(409, "AlreadyExists", f"{key[1]} already exists")
        return 201, copy.deepcopy(self._store(key, payload))

    def _store(self, key, obj: dict) -> dict:
        obj.setdefault("metadata", {})["generation"] = 1
        obj["metadata"]["namespace"] = key[0]
        self.objects[key] = obj
        self._changed(key, None)
        return obj

    def _patch(self, namespace: str, name: str, payload: dict) -> tuple[int, dict]:
        key = (namespace, name)
        if key not in self.objects:
            return _status_body(404, "NotFound", f'inferenceservices "{name}" not found')
        if self.conflicts_on_patch > 0:
            self.conflicts_on_patch -= 1
            return _status_body(409, "Conflict", "the object has been modified; try again")
        current = self.objects[key]
        merged = merge_patch(current, payload)
        if errors := self._validate(merged):
            return _status_body(422, "Invalid", "; ".join(errors))
        self.objects[key] = merged
        if merged.get("spec") != current.get("spec"):
            merged["metadata"]["generation"] = current["metadata"]["generation"] + 1
            self._changed(key, current)
        return 200, copy.deepcopy(merged)

    # -- serving -----------------------------------------------------------------------
    def serve(self, tls: tuple[str, str] | None = None) -> ThreadingHTTPServer:
        return serve_json(self.handle, tls)


class _Response:
    """What the SDKs' ``ApiClient.deserialize`` reads: a response with a JSON body."""

    def __init__(self, value) -> None:
        self.data = json.dumps(value)


def sdk_object(value, type_name: str = "V1beta1InferenceService"):
    """``value`` deserialised by the SDKs into their model objects.

    kserve's ``ApiClient.deserialize`` looks every nested type up in ``kserve.models``,
    where the Kubernetes types its models refer to (V1ObjectMeta, V1Container, ...) are
    not, and the kubernetes package's looks only in its own. So KServe's models are built
    here the way its deserialiser builds them (the fields its ``attribute_map`` names, each
    of its ``openapi_types``, then its constructor, which checks required fields), and
    every other type, Kubernetes model or primitive, is the kubernetes SDK's to read."""
    from kubernetes import client as k8s

    from components.serving.kserve_model import import_kserve

    model = getattr(import_kserve().models, type_name, None)
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise TypeError(f"{type_name} expected, got {type(value).__name__}")
        return [sdk_object(item, match[1]) for item in value]
    if match := re.fullmatch(r"dict\(([^,]*), (.+)\)", type_name):
        if not isinstance(value, dict):
            raise TypeError(f"{type_name} expected, got {type(value).__name__}")
        return {key: sdk_object(item, match[2]) for key, item in value.items()}
    if model is None:
        return k8s.ApiClient().deserialize(_Response(value), type_name)
    if not isinstance(value, dict):
        raise TypeError(f"{type_name} expected, got {type(value).__name__}")
    return model(
        **{
            attribute: sdk_object(value[key], model.openapi_types[attribute])
            for attribute, key in model.attribute_map.items()
            if value.get(key) is not None
        }
    )


def sdk_errors(body: dict) -> list[str]:
    """Where the SDK's reading of an InferenceService body differs from the body: fields
    its models do not have (dropped), values of another type (converted or refused)."""
    from kubernetes import client as k8s

    try:
        kept = k8s.ApiClient().sanitize_for_serialization(sdk_object(body))
    except (AttributeError, TypeError, ValueError) as error:  # a shape it cannot read
        return [f"refused by the SDK: {type(error).__name__}: {error}"]
    return _differences(body, kept)


def _differences(sent, kept, path: str = "") -> list[str]:
    if isinstance(sent, dict) and isinstance(kept, dict):
        errors = []
        for key, value in sent.items():
            if value is None:  # JSON null: absent, as the API server reads it
                continue
            if key not in kept:
                errors.append(f"{path}.{key}: not a field of the SDK's model")
            else:
                errors += _differences(value, kept[key], f"{path}.{key}")
        return errors
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        pairs = enumerate(zip(sent, kept, strict=True))
        return [e for i, (a, b) in pairs for e in _differences(a, b, f"{path}[{i}]")]
    if sent == kept and type(sent) is type(kept):
        return []
    return [f"{path or '/'}: {sent!r} is read by the SDK as {kept!r}"]


def _status_body(code: int, reason: str, message) -> tuple[int, dict]:
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": str(message),
        "reason": reason,
        "code": code,
    }


def self_signed_certificate(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key: the API server's, and the ca.crt of a
    service-account token Secret."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)
