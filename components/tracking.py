"""MLflow: runs, the FOD model as an MLflow pyfunc, and readable errors when MLflow is down.

The registered model is the FOD artefact directory wrapped in a small pyfunc, so
``models:/fod-<category>@champion`` can be downloaded and loaded anywhere ``fod_core`` is
installed (the serving image) without pickled code.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd

log = logging.getLogger(__name__)

ARTIFACT_KEY = "fod_model"


class TrackingError(RuntimeError):
    """MLflow is unreachable or refused a request."""


def experiment_name(category: str) -> str:
    return f"fod-{category}"


def registered_name(category: str) -> str:
    return f"fod-{category}"


def connect(tracking_uri: str, category: str) -> str:
    """Point MLflow at the server and make sure the category's experiment exists."""
    import requests

    mlflow.set_tracking_uri(tracking_uri)
    if tracking_uri.startswith("http"):
        try:
            requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except requests.RequestException as error:
            raise TrackingError(
                f"MLflow at {tracking_uri} is unreachable ({error}); is the stack up? "
                "(`fod stack status`)"
            ) from error
    experiment = mlflow.set_experiment(experiment_name(category))
    return experiment.experiment_id


def code_version(repo: str | Path = ".") -> str:
    """The git commit of the code (with '-dirty' when it has uncommitted changes).

    Where git cannot tell (no checkout, no git, a checkout another user owns that git
    refuses as "dubious ownership"), the package version stands in, and a warning says why:
    a run recorded against a version instead of a commit is harder to reproduce."""
    from importlib.metadata import version

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        rev = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return f"{rev}-dirty" if dirty else rev
    except (OSError, subprocess.CalledProcessError) as error:
        stderr = getattr(error, "stderr", None) or str(error)
        why = next((line for line in stderr.splitlines() if line.strip()), "no output")
        fallback = f"fod-pipeline=={version('fod-pipeline')}"
        log.warning(
            "code version: git cannot read the commit of %s (%s); recording %s instead",
            Path(repo).resolve(), why.strip()[:300], fallback,
        )  # fmt: skip
        return fallback


class FODPyfunc(mlflow.pyfunc.PythonModel):
    """Scores images given as bytes; the same ``AnomalyDetector`` path as ``fod predict``."""

    def load_context(self, context) -> None:
        from fod_core.artifact import load_detector

        self.detector = load_detector(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """``model_input['image']``: bytes or base64 strings (a DataFrame type hint tells
        MLflow not to infer a schema)."""
        import base64

        column = model_input["image"] if hasattr(model_input, "columns") else model_input
        images = [
            base64.b64decode(item) if isinstance(item, str) else bytes(item) for item in column
        ]
        predictions = self.detector.predict(images)
        return pd.DataFrame(
            {
                "score": [p.score for p in predictions],
                "is_anomalous": [p.is_anomalous for p in predictions],
                "threshold": [self.detector.post.threshold] * len(predictions),
            }
        )


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"fod-pipeline=={version('fod-pipeline')}",
        f"torch=={version('torch').split('+')[0]}",
        f"timm=={version('timm')}",
    ]


def log_fod_model(model_dir: str | Path, run_id: str) -> str:
    """Log the artefact as a pyfunc model in ``run_id``; returns the model URI."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=FODPyfunc(),
            artifacts={ARTIFACT_KEY: str(model_dir)},
            pip_requirements=pip_requirements(),
        )
    return info.model_uri


def log_calibration(run_id: str, threshold) -> None:
    """The calibrated threshold and its promise, in the training run (the one place)."""
    metrics = {"threshold": threshold.value}
    if threshold.guaranteed_false_alarm_rate is not None:
        metrics["guaranteed_false_alarm_rate"] = threshold.guaranteed_false_alarm_rate
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(metrics)
        mlflow.log_param("threshold.mode", threshold.mode.value)


def download_fod_model(model_uri: str, dest: str | Path) -> Path:
    """The FOD artefact directory of a logged/registered model (e.g. ``models:/x@champion``)."""
    from fod_core.artifact import ArtifactError, find_model_dir

    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest))
    try:
        return find_model_dir(local)
    except ArtifactError as error:
        raise TrackingError(f"{model_uri}: {error}") from error


def level_weights_tag(model_dir: str | Path) -> str:
    """How a model combines its levels, as a tag value: 'equal' or e.g. '0.9,0.1'."""
    from fod_core.artifact import read_manifest

    weights = read_manifest(model_dir)["postprocessing"].get("level_weights")
    return "equal" if weights is None else ",".join(map(str, weights))
