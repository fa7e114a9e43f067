"""The deploy step against the Kubernetes API: create, merge-patch, 403, 409, a Ready that
arrives late, and a timeout that changes nothing in the cluster but gives the champion
alias back to the version KServe still serves.

No real Kubernetes API server can be installed here; ``kube_api.FakeKubeApi`` answers the
InferenceService CRD's paths on loopback (see its docstring) and validates every body
against the KServe SDK's models. The client side is the real one: the kubernetes package
with a kubeconfig, or with a service-account token Secret over TLS as in the pod.
"""

from __future__ import annotations

import pytest
import yaml
from kube_api import FakeKubeApi, self_signed_certificate
from registered import register_version

from components import kserve_rollout
from components.deploy import inference_service, served_version
from components.errors import DeploymentError
from components.kserve_rollout import (
    NotReady,
    apply_inference_service,
    kubernetes_api,
    wait_until_ready,
)

EXAMPLE = dict(storage_uri="s3://fod/mlflow/1/models/m-1/artifacts", model_version="1")


@pytest.fixture
def kube(tmp_path, monkeypatch):
    """A fake API server and a kubeconfig that points at it (as ``kubectl`` would use)."""
    api = FakeKubeApi()
    server = api.serve()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"},
                    }
                ],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
                "users": [{"name": "u", "user": {"token": api.token}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("FOD_DEPLOYER_TOKEN_DIR", str(tmp_path / "no-token"))
    yield api
    server.shutdown()


def manifest(**options) -> dict:
    return inference_service("fod-bottle", **(EXAMPLE | options))


def test_create_then_wait_until_the_new_revision_is_ready(kube):
    applied = apply_inference_service(manifest())
    assert (applied.action, applied.name, applied.namespace) == ("created", "fod-bottle", "fod")
    assert [m for m, _ in kube.requests] == ["GET", "POST"]  # 404 first, then create
    service = wait_until_ready(applied, timeout=10, poll=0.01)
    assert service["status"]["components"]["predictor"]["latestReadyRevision"] == (
        "fod-bottle-predictor-00001"
    )
    assert kube.invalid_bodies == []


MODES = ["Serverless", "RawDeployment"]


def version(number: int, **options) -> dict:
    uri = f"s3://fod/mlflow/1/models/m-{number}/artifacts"
    return manifest(model_version=str(number), storage_uri=uri, **options)


def deployed(kube, number: int, **options):
    """Apply version ``number`` and wait until it serves."""
    applied = apply_inference_service(version(number, **options))
    return applied, wait_until_ready(applied, timeout=10, poll=0.01)


def carried_model(kube) -> str:
    (deployment,) = kube.deployments.values()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return next(e["value"] for e in container["env"] if e["name"] == "STORAGE_URI")


@pytest.mark.parametrize("mode", MODES)
def test_patch_waits_past_the_previous_state(kube, mode):
    """Right after a patch the status still says Ready, for the old revision or the old
    Deployment, and its observedGeneration (a child's) may well exceed the
    InferenceService's generation: neither may count."""
    kube.mode = mode
    kube.polls_until_ready = 0
    deployed(kube, 1)
    kube.polls_until_ready = 6
    applied = apply_inference_service(version(2))
    assert (applied.action, applied.generation) == ("patched", 2)
    service = wait_until_ready(applied, timeout=10, poll=0.01)
    assert not kube._rollout  # returned only once the controller had finished
    if mode == "Serverless":
        predictor = service["status"]["components"]["predictor"]
        assert predictor["latestReadyRevision"].endswith("00002")
        assert predictor["traffic"] == [
            {"revisionName": "fod-bottle-predictor-00002", "latestRevision": True, "percent": 100}
        ]
    else:
        assert carried_model(kube).endswith("m-2/artifacts")
        (deployment,) = kube.deployments.values()
        assert deployment["status"]["replicas"] == deployment["status"]["availableReplicas"] == 1
    stored = kube.objects[("fod", "fod-bottle")]
    assert stored["metadata"]["annotations"]["fod/model-version"] == "2"
    assert kube.invalid_bodies == []


def test_raw_an_hpa_scaled_deployment_is_not_taken_for_rolled_out(kube):
    """The HPA raised the Deployment's generation above the InferenceService's: KServe's
    copied observedGeneration then says "seen" at once, on the old pods."""
    kube.mode, kube.hpa_scalings, kube.polls_until_ready = "RawDeployment", 5, 0
    deployed(kube, 1)
    kube.polls_until_ready = 6
    applied = apply_inference_service(version(2))
    stale = kube._status(("fod", "fod-bottle"))
    assert stale["observedGeneration"] > applied.generation  # what misled the old wait
    wait_until_ready(applied, timeout=10, poll=0.01)
    assert carried_model(kube).endswith("m-2/artifacts") and not kube._rollout


def test_raw_a_crash_looping_new_pod_is_not_ready(kube):
    """KServe 0.15's Ready is the Deployment's Available: true while the old pod serves and
    the new one crash-loops. The wait must see the rollout stuck."""
    kube.mode, kube.polls_until_ready = "RawDeployment", 0
    deployed(kube, 1)
    kube.never_ready = True
    applied = apply_inference_service(version(2))
    with pytest.raises(NotReady) as error:
        wait_until_ready(applied, timeout=0.3, poll=0.01)
    assert "1 old replica(s) still running" in str(error.value)
    ready = {c["type"]: c["status"] for c in error.value.last_seen["status"]["conditions"]}
    assert ready["Ready"] == "True"  # KServe said Ready all along


def test_raw_a_canary_promote_does_not_wait_for_a_rollout_that_never_comes(kube):
    """A promote changes the canary share only: the Deployment stays as it is, and the
    InferenceService's generation moves past the copied observedGeneration for good."""
    kube.mode, kube.polls_until_ready = "RawDeployment", 0
    deployed(kube, 1)
    deployed(kube, 2, canary_traffic_percent=10)
    applied = apply_inference_service(version(2))  # promote: no canary share
    assert not applied.new_revision and applied.generation == 3
    kube.polls_until_ready = 4
    wait_until_ready(applied, timeout=2, poll=0.01)
    assert carried_model(kube).endswith("m-2/artifacts")


def test_serverless_a_canary_then_its_promote(kube):
    """A canary is ready when its revision is and has its share of the traffic; its
    promote makes no revision and is ready once all traffic moved."""
    kube.polls_until_ready = 4
    deployed(kube, 1)
    _, service = deployed(kube, 2, canary_traffic_percent=10)
    traffic = service["status"]["components"]["predictor"]["traffic"]
    assert {t["revisionName"]: t["percent"] for t in traffic} == {
        "fod-bottle-predictor-00002": 10,
        "fod-bottle-predictor-00001": 90,
    }
    promote = apply_inference_service(version(2))
    assert not promote.new_revision and promote.previous_revision.endswith("00002")
    service = wait_until_ready(promote, timeout=10, poll=0.01)
    predictor = service["status"]["components"]["predictor"]
    assert predictor["latestCreatedRevision"].endswith("00002")  # no new revision
    assert [t["percent"] for t in predictor["traffic"]] == [100]


def test_the_mode_is_the_controllers_record_then_the_annotation():
    from components.kserve_rollout import ServingMode, UnknownMode, serving_mode

    def service(status=None, annotation=None):
        annotations = {"serving.kserve.io/deploymentMode": annotation} if annotation else {}
        return {"metadata": {"name": "m", "annotations": annotations}, "status": status or {}}

    assert serving_mode(service()) is None  # not reconciled: the cluster default applies
    assert serving_mode(service(annotation="RawDeployment")) is ServingMode.RAW
    assert serving_mode(service({"deploymentMode": "Standard"})) is ServingMode.RAW  # 0.16
    assert serving_mode(service({"deploymentMode": "Knative"}, "RawDeployment")) is (
        ServingMode.SERVERLESS
    )
    with pytest.raises(UnknownMode, match="ModelMesh"):
        serving_mode(service({"deploymentMode": "ModelMesh"}))


def test_raw_without_the_right_to_read_deployments_fails_at_once(kube):
    kube.mode, kube.polls_until_ready = "RawDeployment", 0
    kube.forbidden = {"get-deployments"}
    applied = apply_inference_service(version(1))
    with pytest.raises(DeploymentError, match=r"may not get Deployments in namespace fod \(403"):
        wait_until_ready(applied, timeout=30, poll=0.01)


def test_patch_clears_an_old_canary_split(kube):
    """A merge patch keeps fields it does not name: the canary share must be nulled."""
    apply_inference_service(manifest(canary_traffic_percent=10))
    assert kube.objects[("fod", "fod-bottle")]["spec"]["predictor"]["canaryTrafficPercent"] == 10
    apply_inference_service(manifest(model_version="2"))
    assert "canaryTrafficPercent" not in kube.objects[("fod", "fod-bottle")]["spec"]["predictor"]


@pytest.mark.parametrize("verb", ["get", "create", "patch"])
def test_forbidden_names_the_identity_and_the_role(kube, verb):
    if verb == "patch":
        apply_inference_service(manifest())
    kube.forbidden = {verb}
    with pytest.raises(DeploymentError) as error:
        apply_inference_service(manifest(model_version="2"))
    message = str(error.value)
    assert f"may not {verb} InferenceServices in namespace fod (403" in message
    assert "kubeconfig" in message and "fod-deployer" in message
    if verb == "get":  # a 403 on get is not taken for "absent"
        assert [m for m, _ in kube.requests] == ["GET"]


def test_conflicts_are_resolved_by_patching_and_retrying(kube, monkeypatch):
    monkeypatch.setattr(kserve_rollout.time, "sleep", lambda seconds: None)
    kube.conflicts_on_create = 1  # created by someone else between our GET and POST
    kube.conflicts_on_patch = 2  # then two concurrent writers
    applied = apply_inference_service(manifest())
    assert applied.action == "patched"
    assert [m for m, _ in kube.requests] == ["GET", "POST", "GET", "PATCH", "PATCH", "PATCH"]
    kube.conflicts_on_patch = 3
    with pytest.raises(DeploymentError, match="could not patch"):
        apply_inference_service(manifest(model_version="3"))


def test_a_timeout_changes_nothing_in_the_cluster_and_says_what_is_served(kube):
    wait_until_ready(apply_inference_service(manifest()), timeout=10, poll=0.01)
    kube.never_ready = True
    applied = apply_inference_service(manifest(model_version="2"))
    with pytest.raises(NotReady) as error:
        wait_until_ready(applied, timeout=0.2, poll=0.01)
    message = str(error.value)
    assert "was not Ready for generation 2 within 0.2s" in message
    assert "last seen: revision fod-bottle-predictor-00002 is not ready yet" in message
    assert "KServe keeps serving its last ready revision (fod-bottle-predictor-00001)" in message
    assert "kubectl -n fod describe inferenceservice fod-bottle" in message
    assert error.value.last_seen["metadata"]["annotations"]["fod/model-version"] == "2"


def test_the_served_version_is_the_one_deployed_on_the_ready_revision():
    """What ``deployed`` tags say KServe serves: Serverless names the ready revision (a
    recreated InferenceService reuses revision names, so the latest tag wins); RawDeployment
    names none, and the last Ready rollout is what its Deployment still runs."""
    versions = [
        ("1", {"deployed": "kserve 2026-01-01T00:00:00+00:00 fod-b-predictor-00001"}),
        ("2", {"deployed": "kserve 2026-01-02T00:00:00+00:00 fod-b-predictor-00002"}),
        ("3", {"deployed": "local 2026-01-03T00:00:00+00:00"}),  # not the cluster
        ("4", {"deployed": "kserve 2026-01-04T00:00:00+00:00 fod-b-predictor-00001"}),
        ("5", {}),  # promoted, never Ready
    ]

    def status(revision):
        return {"status": {"components": {"predictor": {"latestReadyRevision": revision}}}}

    assert served_version(versions, status("fod-b-predictor-00002")) == "2"
    assert served_version(versions, status("fod-b-predictor-00001")) == "4"
    assert served_version(versions, status("fod-b-predictor-00009")) is None
    assert served_version(versions, {"status": {}}) == "4"  # RawDeployment
    assert served_version(versions[2:3] + versions[4:], None) is None


def test_an_invalid_body_is_refused_by_the_schema(kube):
    bad = manifest()
    bad["spec"]["predictor"]["replicas"] = 2  # not a field of the CRD's predictor
    with pytest.raises(DeploymentError, match="Invalid"):
        apply_inference_service(bad)
    assert kube.invalid_bodies


def test_the_deployer_token_secret_is_used_over_tls(tmp_path, monkeypatch):
    """In the pipeline's deploy step: the fod-deployer token Secret (token, ca.crt) mounted
    as a volume, the API server from KUBERNETES_SERVICE_HOST/PORT, over verified TLS."""
    token_dir = tmp_path / "fod-deployer"
    token_dir.mkdir()
    api = FakeKubeApi(token="the-deployers-token")
    server = api.serve(tls=self_signed_certificate(token_dir))
    try:
        (token_dir / "token").write_text("the-deployers-token\n")
        monkeypatch.setenv("FOD_DEPLOYER_TOKEN_DIR", str(token_dir))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
        client = kubernetes_api()
        assert str(token_dir) in client.identity
        applied = apply_inference_service(manifest(), client=client)
        assert applied.action == "created"
        (token_dir / "token").write_text("a-stolen-token")
        with pytest.raises(DeploymentError, match=r"\(401"):
            apply_inference_service(manifest(), client=kubernetes_api())
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_version_that_never_becomes_ready_gives_the_alias_back(
    kube, settings, model_a, monkeypatch
):
    """Registration moves the champion alias before the deploy step runs. When the new
    version never becomes Ready, KServe keeps serving the old one, so the alias must go back
    to it: registry and cluster name the same version, and the message says which."""
    from mlflow import MlflowClient

    from components.deploy import DeployTarget, deploy_champion

    monkeypatch.setattr(kserve_rollout, "READY_POLL_SECONDS", 0.01)
    client = MlflowClient()
    served = register_version(settings, model_a, "kube")
    first = deploy_champion("fod-kube", served, DeployTarget.KSERVE, ready_timeout=10)
    assert first["revision"] == "fod-kube-predictor-00001"
    tag = client.get_model_version("fod-kube", served).tags["deployed"]
    assert tag.startswith("kserve ") and tag.endswith("fod-kube-predictor-00001")

    failed = register_version(settings, model_a, "kube")  # passes the gates: promoted
    assert client.get_model_version_by_alias("fod-kube", "champion").version == failed
    kube.never_ready = True
    with pytest.raises(DeploymentError) as error:
        deploy_champion("fod-kube", failed, DeployTarget.KSERVE, ready_timeout=0.3)
    message = str(error.value)
    assert client.get_model_version_by_alias("fod-kube", "champion").version == served
    assert f"v{served} is served (revision fod-kube-predictor-00001)" in message
    assert f"champion alias was moved back from v{failed} to v{served}" in message
    assert "not Ready for generation 2 within 0.3s" in message
    assert "revision fod-kube-predictor-00002 is not ready yet" in message
    tags = client.get_model_version("fod-kube", failed).tags
    assert "deployed" not in tags  # a retrain check must not take it for a served version
    assert "not Ready" in tags["deploy_failed"] and "is not ready yet" in tags["deploy_failed"]
    stored = kube.objects[("fod", "fod-kube")]
    assert stored["metadata"]["annotations"]["fod/model-version"] == str(failed)

    kube.never_ready = False  # fixed; the rollback of docs/deploy.md, forwards this time
    client.set_registered_model_alias("fod-kube", "champion", failed)
    deploy_champion("fod-kube", failed, DeployTarget.KSERVE, ready_timeout=10)
    tags = client.get_model_version("fod-kube", failed).tags
    assert tags["deployed"].endswith("fod-kube-predictor-00002") and "deploy_failed" not in tags


@pytest.mark.slow
def test_a_first_deploy_that_never_becomes_ready_keeps_the_alias(
    kube, settings, model_a, monkeypatch
):
    """Nothing was served before: there is no version to go back to, and the message says
    so instead of naming one."""
    from mlflow import MlflowClient

    from components.deploy import DeployTarget, deploy_champion

    monkeypatch.setattr(kserve_rollout, "READY_POLL_SECONDS", 0.01)
    version = register_version(settings, model_a, "kube-first")
    kube.never_ready = True
    with pytest.raises(DeploymentError) as error:
        deploy_champion("fod-kube-first", version, DeployTarget.KSERVE, ready_timeout=0.3)
    message = str(error.value)
    assert "no version is known to be served" in message
    assert f"champion alias stays on v{version}" in message
    client = MlflowClient()
    assert client.get_model_version_by_alias("fod-kube-first", "champion").version == version
    assert "deploy_failed" in client.get_model_version("fod-kube-first", version).tags
