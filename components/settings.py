"""Where the pipeline's services are: S3 (data, feature cache, MLflow artifacts) and MLflow.

One settings object, read from the environment, so the same components run against the
embedded loopback stack on a laptop, against MinIO/SeaweedFS in a cluster, or AWS S3:

    FOD_S3_ENDPOINT        S3 endpoint URL (unset: AWS S3)
    AWS_ACCESS_KEY_ID      S3 credentials (in a cluster: from a Secret, never in the repo)
    AWS_SECRET_ACCESS_KEY
    AWS_DEFAULT_REGION     default us-east-1
    FOD_BUCKET             bucket for DVC data, the feature cache and models (default fod)
    MLFLOW_TRACKING_URI    MLflow tracking server
    FOD_MLFLOW_ARTIFACTS   that server's --artifacts-destination (default s3://<bucket>/mlflow)
    FOD_IMAGE              the CPU image of a cluster's steps and model server
    FOD_CUDA_IMAGE         the CUDA image of the training step
    FOD_GPU_TOLERATIONS    the training step's tolerations of GPU nodes' taints (a JSON
                           list of Kubernetes tolerations; "[]": none)
    FOD_DECISION_RECORD    where a cluster's model servers ship their decision record
                           (s3://<bucket>/records in infra/; unset or "none": not shipped)

Where none of these is set, the embedded stack's state file (``fod stack up``) is used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BUCKET = "fod"
# The images a cluster runs (infra/images/Dockerfile builds both). Yours are named by
# FOD_IMAGE and FOD_CUDA_IMAGE, read when the pipeline is compiled or submitted and by the
# deploy step (the fod-settings ConfigMap carries them), so no code edit is needed.
DEFAULT_IMAGE = "ghcr.io/fod-pipeline/fod-pipeline:0.1.0"
DEFAULT_CUDA_IMAGE = f"{DEFAULT_IMAGE}-cuda"
# In a cluster the settings come from these (infra/base): endpoints in a ConfigMap, the S3
# keys in a Secret that the user creates.
CLUSTER_CONFIG_MAP = "fod-settings"
CLUSTER_CONFIG_KEYS = (
    "FOD_S3_ENDPOINT",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "FOD_BUCKET",
    "FOD_MLFLOW_ARTIFACTS",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "FOD_IMAGE",
    "FOD_CUDA_IMAGE",
    "FOD_GPU_TOLERATIONS",
    "FOD_DECISION_RECORD",
)
CLUSTER_SECRET = "fod-s3-credentials"
CLUSTER_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
ENV_KEYS = ("FOD_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID")


@dataclass(frozen=True)
class Images:
    """The image per role: CUDA for the training step, CPU for every other step, the model
    server, MLflow and the retrain check."""

    cpu: str
    cuda: str


def images() -> Images:
    return Images(
        cpu=os.environ.get("FOD_IMAGE") or DEFAULT_IMAGE,
        cuda=os.environ.get("FOD_CUDA_IMAGE") or DEFAULT_CUDA_IMAGE,
    )


# Most GPU node pools carry this taint (GKE, AKS, the NVIDIA GPU Operator's docs).
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
_TOLERATION_FIELDS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def gpu_tolerations() -> list[dict]:
    """The training step's tolerations (FOD_GPU_TOLERATIONS), read when the pipeline is
    compiled or submitted, like the images. They compile to plain Kubernetes fields, which
    every KFP backend from 2.2 applies; a run-time parameter would compile to
    ``tolerationJson``, which backends before 2.5.0 drop, leaving an empty toleration that
    the API server rejects (kubeflow/pipelines#11860). Checked here by Kubernetes' rules,
    so that a mistake fails at compile time, not as a pod that never starts."""
    text = os.environ.get("FOD_GPU_TOLERATIONS", "").strip()
    if not text:
        return [dict(t) for t in DEFAULT_GPU_TOLERATIONS]
    try:
        tolerations = json.loads(text)
    except ValueError as error:
        raise SettingsError(f"FOD_GPU_TOLERATIONS is not JSON: {error}") from error
    if not isinstance(tolerations, list) or not all(isinstance(t, dict) for t in tolerations):
        raise SettingsError("FOD_GPU_TOLERATIONS must be a JSON list of tolerations")
    for toleration in tolerations:
        if problem := toleration_problem(toleration):
            raise SettingsError(f"FOD_GPU_TOLERATIONS: {json.dumps(toleration)}: {problem}")
    return tolerations


def toleration_problem(toleration: dict) -> str | None:
    """What Kubernetes' validation (ValidateTolerations) refuses in a toleration; None."""
    if unknown := set(toleration) - _TOLERATION_FIELDS:
        return f"unknown field(s) {', '.join(sorted(unknown))}"
    operator = toleration.get("operator") or "Equal"
    if operator not in ("Equal", "Exists"):
        return f"operator must be Equal or Exists, not {operator}"
    if not toleration.get("key") and operator != "Exists":
        return "an empty key needs operator Exists"
    if operator == "Exists" and toleration.get("value"):
        return "operator Exists takes no value"
    effect = toleration.get("effect") or ""
    if effect not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute"):
        return f"effect {effect} is not NoSchedule, PreferNoSchedule or NoExecute"
    seconds = toleration.get("tolerationSeconds")
    if seconds is not None and (effect != "NoExecute" or not isinstance(seconds, int)):
        return "tolerationSeconds (an integer) goes with effect NoExecute only"
    return None


def shipped_record() -> str | None:
    """The S3 location of the shipped decision record (FOD_DECISION_RECORD), if any: where
    InferenceServices ship their decisions and ``fod monitor``/``fod review`` read them."""
    value = os.environ.get("FOD_DECISION_RECORD", "").strip()
    return None if value.lower() in ("", "none") else value


class SettingsError(RuntimeError):
    """No stack is configured, or its configuration is incomplete."""


def fod_home() -> Path:
    """The git-ignored folder with the embedded stack's state and generated credentials."""
    return Path(os.environ.get("FOD_HOME", Path.cwd() / ".fod")).resolve()


@dataclass(frozen=True)
class StackSettings:
    mlflow_uri: str
    access_key: str
    secret_key: str
    s3_endpoint: str | None = None
    bucket: str = DEFAULT_BUCKET
    region: str = "us-east-1"

    @property
    def mlflow_artifacts(self) -> str:
        """The MLflow server's --artifacts-destination (the embedded stack's, unless set)."""
        return os.environ.get("FOD_MLFLOW_ARTIFACTS") or f"s3://{self.bucket}/mlflow"

    def env(self) -> dict[str, str]:
        """Environment for child processes (components, DVC, MLflow's S3 client)."""
        env = {
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "FOD_BUCKET": self.bucket,
        }
        if self.s3_endpoint:
            env |= {"FOD_S3_ENDPOINT": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}
        return env

    def export(self) -> None:
        os.environ.update(self.env())

    def s3_client(self, *, retries: int = 2, timeout: float = 10.0):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                connect_timeout=timeout,
                read_timeout=timeout * 3,
                retries={"max_attempts": retries, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )

    def public_dict(self) -> dict:
        """What is safe to print or log: everything but the secret."""
        return {
            "mlflow_uri": self.mlflow_uri,
            "s3_endpoint": self.s3_endpoint or "AWS",
            "bucket": self.bucket,
            "access_key": self.access_key,
        }


def load_settings(home: Path | None = None) -> StackSettings:
    """From the environment where it names a stack, else the embedded stack's state."""
    if any(os.environ.get(key) for key in ENV_KEYS):
        missing = [
            key
            for key in ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            if not os.environ.get(key)
        ]
        if missing:
            raise SettingsError(f"incomplete stack configuration: {', '.join(missing)} not set")
        return StackSettings(
            mlflow_uri=os.environ["MLFLOW_TRACKING_URI"],
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            s3_endpoint=os.environ.get("FOD_S3_ENDPOINT") or None,
            bucket=os.environ.get("FOD_BUCKET", DEFAULT_BUCKET),
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        )
    state = (home or fod_home()) / "stack.json"
    if not state.is_file():
        raise SettingsError(
            "no stack configured: run `fod stack up` for the embedded one, or set "
            "MLFLOW_TRACKING_URI, FOD_S3_ENDPOINT and AWS credentials for your own"
        )
    data = json.loads(state.read_text())
    credentials = read_credentials(state.parent)
    return StackSettings(
        mlflow_uri=data["mlflow_uri"],
        access_key=credentials["AWS_ACCESS_KEY_ID"],
        secret_key=credentials["AWS_SECRET_ACCESS_KEY"],
        s3_endpoint=data["s3_endpoint"],
        bucket=data.get("bucket", DEFAULT_BUCKET),
    )


def read_credentials(home: Path) -> dict[str, str]:
    path = home / "credentials.env"
    if not path.is_file():
        raise SettingsError(f"{path} is missing: run `fod stack up` to generate it")
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}
