"""Where the served model comes from: an MLflow model URI (alias or version) or a folder."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from components.errors import ServingError
from fod_core.artifact import read_manifest
from fod_core.calibration import promise_of
from fod_core.export import ExportError, load_runtime
from fod_core.inference import Detector

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


T = TypeVar("T")
TorchRunner = Callable[[Callable[[], T]], T]


def run_here(work: Callable[[], T]) -> T:
    return work()


@dataclass(frozen=True)
class ModelSource:
    """An MLflow model URI (alias or version) or a local directory holding an FOD model.

    A local directory may be the artefact itself or anything above it (an MLflow model
    download, KServe's /mnt/models), as long as it holds exactly one ``fod.json``.
    """

    uri: str
    version: str | None = None  # reported for a directory (e.g. the registry version in a pod)
    # What scores: PyTorch, or the model's exported graph (which must have passed parity).
    runtime: str = "torch"
    # PyTorch's precision: fp32, bf16, or auto (bf16 where native and the model's check passed)
    precision: str = "fp32"

    @property
    def is_registry(self) -> bool:
        return self.uri.startswith("models:/")

    @property
    def follows_alias(self) -> bool:
        match = _MODELS_URI.match(self.uri)
        return bool(match and match["alias"])

    def _parts(self) -> tuple[str, str | None, str | None]:
        match = _MODELS_URI.match(self.uri)
        if not match:
            raise ServingError(
                f"{self.uri!r} is not a model URI of the form models:/NAME@ALIAS or "
                "models:/NAME/VERSION"
            )
        return match["name"], match["alias"], match["version"]

    def current_version(self) -> str:
        """The version the source points at now (a registry version, or the artefact's
        creation stamp for a directory)."""
        if not self.is_registry:
            manifest = read_manifest(_find_artifact(Path(self.uri)))
            return self.version or str(manifest.get("created_at", "local"))
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name, alias, version = self._parts()
        if version:
            return version
        try:
            return str(MlflowClient().get_model_version_by_alias(name, alias).version)
        except MlflowException as error:
            text = error.message
            if "Max retries exceeded" in text or "Connection refused" in text:
                import mlflow

                text = f"the registry, MLflow at {mlflow.get_tracking_uri()}, does not answer"
            raise ServingError(f"{self.uri}: {text}") from error

    def load(self, version: str, *, run_torch: TorchRunner = run_here) -> LoadedModel:
        """Load one version; a registry version is fetched by number, so an alias that
        moves meanwhile cannot mix two versions. The download runs on the calling thread,
        the PyTorch part through ``run_torch`` (see ``BatchScorer.call``)."""
        if not self.is_registry:
            return _loaded(_find_artifact(Path(self.uri)), version, run_torch, self)
        from components.tracking import download_fod_model

        name, _, _ = self._parts()
        with tempfile.TemporaryDirectory(prefix="fod-serve-") as tmp:
            model_dir = download_fod_model(f"models:/{name}/{version}", tmp)
            # reads everything into memory
            return _loaded(model_dir, version, run_torch, self)

    @property
    def model_name(self) -> str:
        if self.is_registry:
            return self._parts()[0]
        from components.tracking import registered_name

        category = read_manifest(_find_artifact(Path(self.uri))).get("category")
        return registered_name(category) if category else "fod"


def _find_artifact(path: Path) -> Path:
    from fod_core.artifact import ArtifactError, find_model_dir

    try:
        return find_model_dir(path)
    except ArtifactError as error:
        raise ServingError(str(error)) from error


@dataclass
class LoadedModel:
    detector: Detector
    version: str
    data_version: str | None = None  # what it was trained on (from its manifest)
    loaded_at: float = field(default_factory=time.time)
    promise: str | None = None  # the threshold's false-alarm promise, in words


def _loaded(
    directory: Path, version: str, run_torch: TorchRunner, source: ModelSource
) -> LoadedModel:
    """A version whose export is missing, stale or failed parity is refused like a broken
    artefact: the served version stays, and the failure shows in /status."""
    manifest = read_manifest(directory)
    data_version = manifest.get("data_version")
    try:
        detector = run_torch(
            lambda: load_runtime(directory, source.runtime, precision=source.precision)
        )
    except ExportError as error:
        raise ServingError(str(error)) from error
    return LoadedModel(detector, version, data_version, promise=promise_of(manifest))
