"""Services a step needs, checked before its work and reported the same way when they fail
during it: one line naming the service, where it is, and what to do (``ServiceDown``).

- ``preflight``: probes with short timeouts (3 s; 15 s for the write MLflow passes on to its
  store). A step that learns of an outage only when it uploads, after minutes of training,
  reports it as a client library's traceback.
- ``mlflow_calls``: MLflow calls made during the work are retried a stated, bounded number
  of times (MLflow's own client retries 7 times over about four minutes by default), then
  fail as one ``ServiceDown``; a 5xx from MLflow's artifact proxy is named for what it is,
  the artifact store behind MLflow being down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid

from components.settings import CLUSTER_CONFIG_MAP, CLUSTER_SECRET, StackSettings

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0  # seconds per probe: a service that answers slower counts as down
# MLflow passes a test write on to its artifact store (S3), retrying there first
ARTIFACT_PROBE_TIMEOUT = 15.0
# MLflow's client retries during a step's work: 1 + 2 + 4 + 8 s of backoff (plus up to 1 s
# of jitter each), then the step fails instead of waiting minutes
MLFLOW_RETRIES, MLFLOW_BACKOFF = 4, 1  # MLflow reads the factor as an integer


class ServiceDown(RuntimeError):
    """A service a step needs does not answer or refuses it; the message says which,
    where, and what to do."""


def in_cluster() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ


def remedy(*keys: str, secret: bool = False) -> str:
    """What to do: on this machine, start the embedded stack; in a cluster, check the
    settings the pod reads."""
    if not in_cluster():
        return "start the stack: `fod stack up` (`fod stack status` shows it)"
    where = f"{', '.join(keys)} in the ConfigMap {CLUSTER_CONFIG_MAP}" if keys else ""
    if secret:
        where += (" and " if where else "") + f"the Secret {CLUSTER_SECRET}"
    return f"check {where} of this namespace, and that the service runs (docs/deploy.md)"


def check_s3(settings: StackSettings) -> None:
    """The bucket answers, with these credentials."""
    from botocore.exceptions import BotoCoreError, ClientError

    where = settings.s3_endpoint or "AWS S3"
    client = settings.s3_client(retries=1, timeout=PROBE_TIMEOUT)
    try:
        client.head_bucket(Bucket=settings.bucket)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            fix = "the Job fod-bucket creates it" if in_cluster() else "`fod stack bucket`"
            raise ServiceDown(
                f"S3 at {where} has no bucket {settings.bucket}: {fix} (FOD_BUCKET)"
            ) from error
        if code in ("403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise ServiceDown(
                f"S3 at {where} refused the credentials for bucket {settings.bucket} "
                f"({code}): {remedy('FOD_S3_ENDPOINT', secret=True)}"
            ) from error
        raise ServiceDown(
            f"S3 at {where} answered {code or error}: {remedy('FOD_S3_ENDPOINT')}"
        ) from error
    except BotoCoreError as error:
        raise ServiceDown(
            f"S3 at {where} is unreachable ({type(error).__name__}): {remedy('FOD_S3_ENDPOINT')}"
        ) from error


def check_mlflow(settings: StackSettings, *, artifacts: bool = True) -> None:
    """MLflow answers; with ``artifacts``, its artifact store takes a write through it (a
    proxying server writes to S3 behind it: that S3 being down shows as MLflow's 5xx)."""
    import requests

    base = settings.mlflow_uri.rstrip("/")
    if not base.startswith("http"):
        return  # a local file store: nothing to reach
    try:
        requests.get(f"{base}/health", timeout=PROBE_TIMEOUT).raise_for_status()
    except requests.RequestException as error:
        raise ServiceDown(
            f"MLflow at {base} does not answer ({_reason(error)}): {remedy('MLFLOW_TRACKING_URI')}"
        ) from error
    if not artifacts:
        return
    path = f"{base}/api/2.0/mlflow-artifacts/artifacts/fod-preflight/{uuid.uuid4().hex}"
    try:
        answer = requests.put(path, data=b"ok", timeout=ARTIFACT_PROBE_TIMEOUT)
    except requests.RequestException as error:
        raise ServiceDown(
            f"MLflow's artifact store does not answer: MLflow at {base} did not complete a "
            f"test write, which it passes on to its artifact destination ({_reason(error)}): "
            f"{remedy('FOD_MLFLOW_ARTIFACTS', 'FOD_S3_ENDPOINT', secret=True)}"
        ) from error
    if answer.status_code == 404:
        return  # not a proxying server: artifacts go to S3 directly, checked as S3
    if answer.status_code >= 500:
        raise ServiceDown(
            f"MLflow's artifact store is down: MLflow at {base} answered {answer.status_code} "
            "to a test write, which it passes on to its artifact destination (the S3 behind "
            f"it): {remedy('FOD_MLFLOW_ARTIFACTS', 'FOD_S3_ENDPOINT', secret=True)}"
        )
    if answer.status_code >= 400:
        raise ServiceDown(
            f"MLflow at {base} refused a test write to its artifact store "
            f"({answer.status_code} {answer.text[:200]}): {remedy('MLFLOW_TRACKING_URI')}"
        )
    with contextlib.suppress(requests.RequestException):  # a leftover probe harms nothing
        requests.delete(path, timeout=PROBE_TIMEOUT)


def _reason(error: Exception) -> str:
    text = str(error)
    return "connection refused" if "Connection refused" in text else type(error).__name__


def preflight(
    settings: StackSettings, *, s3: bool = False, mlflow: bool = False, artifacts: bool = False
) -> float:
    """Check the services a step needs (``artifacts``: MLflow's artifact store takes a
    write); seconds taken. ServiceDown names the first one that is down."""
    started = time.perf_counter()
    if s3:
        check_s3(settings)
    if mlflow or artifacts:
        check_mlflow(settings, artifacts=artifacts)
    seconds = time.perf_counter() - started
    names = (("S3", s3), ("MLflow", mlflow or artifacts), ("its artifact store", artifacts))
    log.info("pre-flight: %s answer (%.2fs)", ", ".join(n for n, on in names if on), seconds)
    return seconds


def retry_window() -> float:
    """The longest the bounded MLflow retries back off, in seconds (jitter included)."""
    return sum(MLFLOW_BACKOFF * 2**i + 1.0 for i in range(MLFLOW_RETRIES))


@contextlib.contextmanager
def mlflow_calls(settings: StackSettings, what: str):
    """MLflow calls in the body: retried by MLflow's client ``MLFLOW_RETRIES`` times with
    backoff, then one ServiceDown naming the service behind the failure. Errors that are
    not an outage (a bad request, a missing run) pass through unchanged."""
    import requests
    from mlflow.exceptions import MlflowException

    saved = {k: os.environ.get(k) for k in _RETRY_ENV}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(MLFLOW_RETRIES)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(MLFLOW_BACKOFF)
    try:
        yield
    except (MlflowException, requests.RequestException) as error:
        text = str(error)
        outage = any(sign in text for sign in _OUTAGE_SIGNS)
        if not outage and not isinstance(error, requests.ConnectionError):
            raise
        tried = f"after {MLFLOW_RETRIES} retries, {retry_window():.0f}s of backoff between them"
        base = settings.mlflow_uri.rstrip("/")
        first = text.strip().splitlines()[0][:300] if text.strip() else type(error).__name__
        if "mlflow-artifacts" in text:
            raise ServiceDown(
                f"{what}: MLflow's artifact store is down ({tried}): MLflow at {base} passes "
                f"artifacts on to the S3 behind it, which failed ({first}): "
                f"{remedy('FOD_MLFLOW_ARTIFACTS', 'FOD_S3_ENDPOINT', secret=True)}"
            ) from error
        raise ServiceDown(
            f"{what}: MLflow at {base} is down ({tried}; {first}): {remedy('MLFLOW_TRACKING_URI')}"
        ) from error
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_RETRY_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
_OUTAGE_SIGNS = (
    "too many 500 error responses", "too many 502", "too many 503", "too many 504",
    "Max retries exceeded", "Connection refused", "Failed to establish a new connection",
    "RemoteDisconnected", "Read timed out", "API request to",
)  # fmt: skip
