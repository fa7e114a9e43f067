"""The KServe model server for FOD: v1 and v2 (REST and gRPC) over the one scoring path.

The predictor scores with ``fod_core``'s ``AnomalyDetector`` (the same pre/post-processing
as ``fod evaluate`` and ``fod predict``). It loads a model from an MLflow URI
(``models:/fod-<category>@champion``) or a local directory, and when it follows an alias it
polls the registry: a new version is loaded in the background and swapped in atomically,
so requests in flight finish on the model they started with.

Requests:
  v1  POST /v1/models/NAME:predict
      {"instances": [{"image_bytes": {"b64": "..."}}, ...],
       "parameters": {"anomaly_map": "png" | "grid", "grid_size": 32}}
  v2  POST /v2/models/NAME/infer (REST or gRPC), one BYTES input of shape [N]: base64
      strings in REST JSON, raw PNG/JPEG bytes in gRPC ``bytes_contents``; request
      parameters as in v1. (The SDK's REST binary-data extension decodes BYTES as UTF-8
      text, so raw image bytes over REST are not supported: use base64 or gRPC.)

Every image yields score, is_anomalous (at the calibrated threshold), threshold, and the
model name and version; optionally its anomaly map as a PNG heatmap or a coarse grid.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

import numpy as np

from fod_core.artifact import load_detector, read_manifest
from fod_core.inference import AnomalyDetector, Prediction
from fod_core.processing import ImageDecodeError, read_image
from fod_core.visualize import prediction_overlay

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8081
DEFAULT_MAX_IMAGES = 32
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # 5000 x 5000; a 900x900 MVTec image is 0.8 MPixel
DEFAULT_GRID_SIZE = 32
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ServingError(RuntimeError):
    """The model to serve cannot be found or loaded."""


T = TypeVar("T")
TorchRunner = Callable[[Callable[[], T]], T]


def _run_here(work: Callable[[], T]) -> T:
    return work()


class InvalidRequest(ValueError):
    """A client's mistake: answered 4xx with this message, never 5xx."""


class MapFormat(str, Enum):
    """How (and whether) a response carries each image's anomaly map."""

    NONE = "none"
    PNG = "png"  # the image | heatmap overlay that `fod predict --heatmaps` writes
    GRID = "grid"  # the map averaged down to grid_size x grid_size floats


def import_kserve():
    """``import kserve`` without letting its module-level argument parser read our argv
    (it parses ``sys.argv`` at import, and a flag such as ``--model`` can abbreviate one
    of its own)."""
    import sys

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
        from kserve import model_server  # noqa: F401  (the module that parses argv)
    finally:
        sys.argv = argv
    return kserve


# -- where the model comes from ---------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """An MLflow model URI (alias or version) or a local directory holding an FOD model.

    A local directory may be the artefact itself or anything above it (an MLflow model
    download, KServe's /mnt/models), as long as it holds exactly one ``fod.json``.
    """

    uri: str
    version: str | None = None  # reported for a directory (e.g. the registry version in a pod)

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
            raise ServingError(f"{self.uri}: {error.message}") from error

    def load(self, version: str, *, run_torch: TorchRunner = _run_here) -> AnomalyDetector:
        """Load one version; a registry version is fetched by number, so an alias that
        moves meanwhile cannot mix two versions. The download runs on the calling thread,
        the PyTorch part through ``run_torch`` (see ``BatchScorer.call``)."""
        if not self.is_registry:
            directory = _find_artifact(Path(self.uri))
            return run_torch(lambda: load_detector(directory))
        from components.tracking import download_fod_model

        name, _, _ = self._parts()
        with tempfile.TemporaryDirectory(prefix="fod-serve-") as tmp:
            model_dir = download_fod_model(f"models:/{name}/{version}", tmp)
            return run_torch(lambda: load_detector(model_dir))  # reads everything into memory

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


# -- request decoding -------------------------------------------------------------------
@dataclass(frozen=True)
class RequestOptions:
    anomaly_map: MapFormat = MapFormat.NONE
    grid_size: int = DEFAULT_GRID_SIZE

    @classmethod
    def parse(cls, parameters: dict | None) -> RequestOptions:
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise InvalidRequest('"parameters" must be an object, e.g. {"anomaly_map": "png"}')
        raw_format = str(parameters.get("anomaly_map", MapFormat.NONE.value)).lower()
        try:
            map_format = MapFormat(raw_format)
        except ValueError:
            choices = ", ".join(f.value for f in MapFormat)
            raise InvalidRequest(
                f"parameter anomaly_map={raw_format!r}: choose one of {choices}"
            ) from None
        try:
            grid_size = int(parameters.get("grid_size", DEFAULT_GRID_SIZE))
        except (TypeError, ValueError, OverflowError):
            raise InvalidRequest("parameter grid_size must be an integer") from None
        if not 1 <= grid_size <= 256:
            raise InvalidRequest(f"parameter grid_size={grid_size} must be in 1..256")
        return cls(map_format, grid_size)


def _b64decode(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}: not valid base64") from None


def decode_v1_instances(payload: dict) -> list[bytes]:
    """v1 instances: {"image_bytes": {"b64": s}}, {"b64": s} or a bare base64 string."""
    if not isinstance(payload, dict) or "instances" not in payload:
        raise InvalidRequest('v1 requests need {"instances": [...]} with base64 images')
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise InvalidRequest('"instances" must be a list')
    images = []
    for index, instance in enumerate(instances):
        where = f"instances[{index}]"
        if isinstance(instance, dict) and isinstance(instance.get("image_bytes"), dict):
            instance = instance["image_bytes"]
        if isinstance(instance, dict) and isinstance(instance.get("b64"), str):
            instance = instance["b64"]
        if not isinstance(instance, str):
            raise InvalidRequest(
                f'{where}: expected {{"image_bytes": {{"b64": "..."}}}} or a base64 string'
            )
        images.append(_b64decode(instance, where))
    return images


def decode_v2_inputs(request) -> list[bytes]:
    """The one BYTES input of a v2 request: raw bytes (gRPC, binary REST) or base64 text."""
    if len(request.inputs) != 1:
        raise InvalidRequest(
            f"expected exactly one input tensor of encoded images, got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidRequest(
            f"input {tensor.name!r} has datatype {tensor.datatype}: send encoded PNG/JPEG "
            "images as a BYTES tensor"
        )
    shape = list(tensor.shape)
    try:
        elements = tensor.as_numpy().reshape(-1).tolist() if tensor.data is None else tensor.data
    except Exception as error:  # malformed raw contents
        raise InvalidRequest(f"input {tensor.name!r}: unreadable contents ({error})") from None
    if not isinstance(elements, list):
        elements = list(elements)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidRequest(f"input {tensor.name!r} has shape {shape}: expected [N] or [N, 1]")
    if shape[0] != len(elements):
        raise InvalidRequest(
            f"input {tensor.name!r} declares shape {shape} but holds {len(elements)} elements"
        )
    images = []
    for index, element in enumerate(elements):
        where = f"{tensor.name}[{index}]"
        if isinstance(element, bytes | bytearray):
            images.append(bytes(element))
        elif isinstance(element, str):
            images.append(_b64decode(element, where))
        else:
            raise InvalidRequest(f"{where}: expected encoded image bytes or base64 text")
    return images


# -- the scoring model ------------------------------------------------------------------
@dataclass
class LoadedModel:
    detector: AnomalyDetector
    version: str
    loaded_at: float = field(default_factory=time.time)


@dataclass
class ImageResult:
    score: float
    is_anomalous: bool | None
    threshold: float | None
    anomaly_map_png: bytes | None = None
    anomaly_map_grid: np.ndarray | None = None


def decode_images(images: list[bytes], *, max_image_pixels: int) -> list:
    """Encoded bytes -> RGB images; a bad one is the client's mistake (4xx) and names its index."""
    decoded = []
    for index, data in enumerate(images):
        try:
            decoded.append(read_image(data, max_pixels=max_image_pixels))
        except ImageDecodeError as error:
            raise InvalidRequest(f"image {index}: {str(error).removeprefix('<bytes>: ')}") from None
    return decoded


def image_results(
    detector: AnomalyDetector,
    decoded: list,
    predictions: list[Prediction],
    options: RequestOptions,
) -> list[ImageResult]:
    """Scores and decisions, plus the anomaly maps in the form the request asked for."""
    threshold = detector.post.threshold
    results = []
    for image, prediction in zip(decoded, predictions, strict=True):
        result = ImageResult(prediction.score, prediction.is_anomalous, threshold)
        if options.anomaly_map is MapFormat.PNG:
            buffer = io.BytesIO()
            prediction_overlay(image, prediction.anomaly_map, threshold).save(buffer, "PNG")
            result.anomaly_map_png = buffer.getvalue()
        elif options.anomaly_map is MapFormat.GRID:
            result.anomaly_map_grid = detector.post.grid(prediction.anomaly_map, options.grid_size)
        results.append(result)
    return results


@dataclass
class _Pending:
    model: LoadedModel
    images: list[bytes]
    options: RequestOptions
    future: Future
    max_pixels: int
    decoded: list = field(default_factory=list)


class BatchScorer:
    """One scoring thread that puts the images of requests waiting at the same time into
    one forward pass (up to ``max_batch`` images): under concurrent load the model runs at
    its larger-batch cost per image, and a lone request is scored at once, never delayed.
    Requests for different model versions (during a reload) are never mixed.

    It is the process's only PyTorch thread: model loading runs here too (``call``).
    A second thread running PyTorch ops gets OpenMP workers of its own, and with more of
    them than cores every op gets slower (``fod_core.runtime``; 20-30% here)."""

    def __init__(self, max_batch: int = 1, stats: dict | None = None) -> None:
        self.max_batch = max_batch
        self.stats = stats if stats is not None else {}
        self._pending: deque[_Pending] = deque()
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fod-score", daemon=True)
        self._thread.start()

    def submit(
        self, model: LoadedModel, images: list[bytes], options: RequestOptions, max_pixels: int
    ) -> Future:
        """Encoded images; decoding happens on the scoring thread too (PyTorch already uses
        every core: more threads would only oversubscribe them)."""
        future: Future = Future()
        with self._ready:
            self._pending.append(_Pending(model, images, options, future, max_pixels))
            self._ready.notify()
        return future

    def call(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the scoring thread, before the next batch, and return its
        result (or raise its error). Scoring waits meanwhile."""
        if threading.current_thread() is self._thread:
            return work()
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the model server is shutting down")
            self._jobs.append((work, future))
            self._ready.notify()
        return future.result()

    def close(self) -> None:
        """Stop the thread; requests still queued fail instead of waiting forever."""
        with self._ready:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            jobs, self._jobs = list(self._jobs), deque()
            self._ready.notify()
        futures = [item.future for item in pending] + [future for _, future in jobs]
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the model server is shutting down"))

    def _run_jobs(self) -> None:
        while True:
            with self._ready:
                if not self._jobs:
                    return
                work, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except BaseException as error:  # the caller gets it; this thread goes on
                    future.set_exception(error)

    def _next_batch(self) -> list[_Pending] | None:
        self._run_jobs()
        with self._ready:
            while not self._pending and not self._closed:
                if self._jobs:
                    break
                self._ready.wait()
            if self._closed:
                return None
            if not self._pending:
                return []
            batch = [self._pending.popleft()]
            size = len(batch[0].images)
            for item in list(self._pending):
                if item.model is batch[0].model and size + len(item.images) <= self.max_batch:
                    self._pending.remove(item)
                    batch.append(item)
                    size += len(item.images)
        # A request whose client gave up (cancelled future) is not scored.
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                self._score(batch)
            except BaseException as error:  # nothing may end this thread: report and go on
                log.exception("scoring failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(
                            error if isinstance(error, Exception) else RuntimeError(str(error))
                        )

    def _score(self, batch: list[_Pending]) -> None:
        """Decode (a request with a bad image fails alone, 4xx), then one forward pass."""
        valid = []
        for item in batch:
            try:
                item.decoded = decode_images(item.images, max_image_pixels=item.max_pixels)
                valid.append(item)
            except InvalidRequest as error:
                item.future.set_exception(error)
        if not valid:
            return
        detector = valid[0].model.detector
        images = [image for item in valid for image in item.decoded]
        predictions = detector.predict(images, batch_size=len(images))
        self.stats["batches"] = self.stats.get("batches", 0) + 1
        self.stats["requests"] = self.stats.get("requests", 0) + len(valid)
        self.stats["images"] = self.stats.get("images", 0) + len(images)
        self.stats["largest_batch_requests"] = max(
            self.stats.get("largest_batch_requests", 0), len(valid)
        )
        start = 0
        for item in valid:
            mine = predictions[start : start + len(item.decoded)]
            start += len(item.decoded)
            item.future.set_result(image_results(detector, item.decoded, mine, item.options))


class FODPredictor:
    """Holds the served model and keeps it on the version its source points at."""

    def __init__(
        self,
        source: ModelSource,
        *,
        poll_interval: float = 10.0,
        retry_failed_after: float = 300.0,
    ) -> None:
        self.source = source
        self.poll_interval = poll_interval
        self.retry_failed_after = retry_failed_after
        self._active: LoadedModel | None = None
        self._loading: str | None = None
        # version -> (error, when): a version that failed to load is tried again only after
        # retry_failed_after seconds (a broken artefact stays broken; an S3 outage passes).
        self._failed: dict[str, tuple[str, float]] = {}
        self.scoring_stats: dict[str, int] = {}  # batches, requests, images scored
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Where PyTorch work runs: here by default; the server's BatchScorer.call, so that
        # loading and scoring share one thread.
        self.run_torch: TorchRunner = _run_here

    @property
    def active(self) -> LoadedModel | None:
        return self._active

    def load_current(self) -> LoadedModel:
        version = self.source.current_version()
        return self._load(version)

    def _load(self, version: str) -> LoadedModel:
        self._loading = version
        started = time.perf_counter()
        try:
            detector = self.source.load(version, run_torch=self.run_torch)
        except Exception as error:
            self._failed[version] = (f"{type(error).__name__}: {error}", time.monotonic())
            raise
        finally:
            self._loading = None
        loaded = LoadedModel(detector, version)
        self._active = loaded  # one reference swap: in-flight requests keep the old model
        self._failed.pop(version, None)
        log.info(
            "serving %s version %s (loaded in %.1fs)",
            self.source.uri,
            version,
            time.perf_counter() - started,
        )
        return loaded

    def check_for_update(self) -> bool:
        """Load the source's current version if it differs from the served one."""
        version = self.source.current_version()
        active = self._active
        if active and active.version == version:
            return False
        failed = self._failed.get(version)
        if failed and time.monotonic() - failed[1] < self.retry_failed_after:
            return False
        log.info("%s moved to version %s; loading it in the background", self.source.uri, version)
        self._load(version)
        return True

    def start_watching(self) -> None:
        if not self.source.follows_alias or self.poll_interval <= 0 or self._watcher:
            return

        def loop() -> None:
            while not self._stop.wait(self.poll_interval):
                try:
                    self.check_for_update()
                except Exception as error:  # the registry is down, a load failed: keep serving
                    log.warning("model update check failed, still serving the old one: %s", error)

        self._watcher = threading.Thread(target=loop, name="fod-model-watch", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()

    def status(self) -> dict:
        active = self._active
        return {
            "source": self.source.uri,
            "ready": active is not None,
            "version": active.version if active else None,
            "loaded_at": active.loaded_at if active else None,
            "loading": self._loading,
            "failed_versions": {v: error for v, (error, _) in dict(self._failed).items()},
            "threshold": active.detector.post.threshold if active else None,
            "scored": dict(self.scoring_stats),
        }


def build_kserve_model(
    name: str,
    predictor: FODPredictor,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_batch: int = 1,
):
    """The kserve.Model around a predictor (kserve is imported here, not at module import)."""
    kserve = import_kserve()
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import (
        InferOutput,
        InferRequest,
        InferResponse,
        to_http_parameters,
    )

    class FODKServeModel(kserve.Model):
        """v1 and v2 predict over ``FODPredictor``: one batching thread decodes and scores
        (the event loop stays free for health checks, the CPU free of oversubscription)."""

        def __init__(self) -> None:
            super().__init__(name)
            self.predictor = predictor
            self._scorer = BatchScorer(max_batch=max_batch, stats=predictor.scoring_stats)
            predictor.run_torch = self._scorer.call  # load on the one PyTorch thread
            self.ready = predictor.active is not None

        def get_input_types(self) -> list[dict]:
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self) -> list[dict]:
            return [
                {"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "is_anomalous", "datatype": "BOOL", "shape": [-1]},
                {"name": "threshold", "datatype": "FP32", "shape": [-1]},
                {"name": "anomaly_map_png", "datatype": "BYTES", "shape": [-1]},
                {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, -1, -1]},
            ]

        def load(self) -> bool:
            if self.predictor.active is None:
                self.predictor.load_current()
            self.ready = True
            return self.ready

        async def predict(self, payload, headers=None, response_headers=None):
            model = self.predictor.active
            if model is None:
                from kserve.errors import ModelNotReady

                raise ModelNotReady(self.name)
            try:
                if isinstance(payload, InferRequest):
                    images = decode_v2_inputs(payload)
                    options = RequestOptions.parse(to_http_parameters(payload.parameters or {}))
                else:
                    images = decode_v1_instances(payload)
                    options = RequestOptions.parse(payload.get("parameters"))
                if not images:
                    raise InvalidRequest("the request holds no images")
                if len(images) > max_images:
                    raise InvalidRequest(
                        f"{len(images)} images in one request; the limit is {max_images}"
                    )
                results = await asyncio.wrap_future(
                    self._scorer.submit(model, images, options, max_image_pixels)
                )
            except InvalidRequest as error:
                raise InvalidInput(str(error)) from None
            if isinstance(payload, InferRequest):
                return self._v2_response(payload, model, results, options)
            return {"predictions": [self._v1_item(model, r) for r in results]}

        def _v1_item(self, model: LoadedModel, result: ImageResult) -> dict:
            item = {
                "score": result.score,
                "is_anomalous": result.is_anomalous,
                "threshold": result.threshold,
                "model_name": self.name,
                "model_version": model.version,
            }
            if result.anomaly_map_png is not None:
                item["anomaly_map_png"] = base64.b64encode(result.anomaly_map_png).decode()
            if result.anomaly_map_grid is not None:
                item["anomaly_map_grid"] = np.round(result.anomaly_map_grid, 6).tolist()
            return item

        def _v2_response(self, request, model, results, options) -> InferResponse:
            n = len(results)
            threshold = results[0].threshold
            outputs = [
                InferOutput("score", [n], "FP32", [r.score for r in results]),
                InferOutput(
                    "is_anomalous",
                    [n],
                    "BOOL",
                    [bool(r.is_anomalous) for r in results],
                ),
                InferOutput(
                    "threshold", [n], "FP32", [float("nan") if threshold is None else threshold] * n
                ),
            ]
            if options.anomaly_map is MapFormat.PNG:
                pngs = [r.anomaly_map_png for r in results]
                data = pngs if request.from_grpc else [base64.b64encode(p).decode() for p in pngs]
                outputs.append(InferOutput("anomaly_map_png", [n], "BYTES", data))
            elif options.anomaly_map is MapFormat.GRID:
                grid = np.stack([r.anomaly_map_grid for r in results]).astype(np.float32)
                output = InferOutput("anomaly_map", list(grid.shape), "FP32")
                output.set_data_from_numpy(grid, binary_data=False)
                outputs.append(output)
            return InferResponse(
                response_id=request.id or "",
                model_name=self.name,
                model_version=model.version,
                infer_outputs=outputs,
                from_grpc=request.from_grpc,
            )

        def stop(self) -> None:
            self.predictor.stop_watching()
            self._scorer.close()
            super().stop()

    return FODKServeModel()


# -- the server -------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # the SDK binds every interface; we bind loopback unless asked
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_images: int = DEFAULT_MAX_IMAGES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Images of concurrent requests scored in one forward pass. 1 on CPU: on the 2-core
    # benchmark machine batching lowered throughput (BENCHMARKS.md); raise it on a GPU.
    max_batch: int = 1
    poll_interval: float = 10.0
    enable_grpc: bool = True


class RequestSizeLimit:
    """ASGI middleware: 413 for HTTP bodies over the limit, counted as they stream in (so a
    chunked upload without Content-Length is limited too). The body is buffered, which
    the model server would do anyway, and replayed to the app."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._reject(send)
                return
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send) -> None:
        body = json.dumps({"error": f"request body over the limit of {self.max_bytes} bytes"})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


def _add_status_route(app, name: str, predictor: FODPredictor) -> None:
    """GET /v2/models/NAME/status: which version is served, which is loading, failures."""

    @app.get(f"/v2/models/{name}/status")
    async def status():
        return predictor.status()


def _requests_that_fail_to_decode_are_400(dataplane) -> None:
    """The SDK turns a request body it cannot decode (e.g. raw image bytes through v2
    REST's binary extension, which it reads as UTF-8 text) into a 500; it is the client's
    request, so answer 400 with what to send instead."""
    from kserve.errors import InferenceError, InvalidInput

    decode = dataplane.decode

    def checked_decode(*args, **kwargs):
        try:
            return decode(*args, **kwargs)
        except InferenceError as error:
            reason = str(error).split(":")[0][:200]
            raise InvalidInput(
                f"the request could not be decoded ({reason}); send images base64-encoded "
                "in JSON, or as raw bytes over gRPC"
            ) from None

    dataplane.decode = checked_decode


def serve(name: str, predictor: FODPredictor, config: ServerConfig) -> None:
    """Start KServe's REST (+gRPC) servers on ``config.host`` and block until stopped."""
    import_kserve()
    from kserve import model_server
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.rest.server import RESTServer

    class LoopbackGRPCServer(GRPCServer):
        """The SDK's gRPC server listens on [::]; this one on the configured host."""

        async def start(self, max_workers):
            from grpc import aio
            from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
            from kserve.protocol.grpc.interceptors import (
                ExceptionToStatusInterceptor,
                LoggingInterceptor,
            )
            from kserve.protocol.grpc.servicer import InferenceServicer

            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[
                    ("grpc.max_send_message_length", config.max_request_bytes),
                    ("grpc.max_receive_message_length", config.max_request_bytes),
                ],
            )
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
                servicer, self._server
            )
            self._server.add_insecure_port(f"{config.host}:{self._port}")
            await self._server.start()
            await self._server.wait_for_termination()

    class LoopbackModelServer(model_server.ModelServer):
        """One REST worker bound to ``config.host``; gRPC likewise."""

        def start(self, models) -> None:
            self._register_and_check_atleast_one_model_is_ready(models)
            self._rest_server = RESTServer(
                model_server.FASTAPI_APP_IMPORT_STRING,
                self.dataplane,
                self.model_repository_extension,
                self.http_port,
                grace_period=self.grace_period,
                timeout_keep_alive=self.timeout_keep_alive,
            )
            self._rest_server.config.host = config.host
            self.servers.append(self._rest_server.start())
            if self.enable_grpc:
                self._grpc_server = LoopbackGRPCServer(
                    self.grpc_port,
                    self.dataplane,
                    self.model_repository_extension,
                    kwargs={},
                    grace_period=self.grace_period,
                )
                self.servers.append(self._grpc_server.start(self.max_threads))
            self.setup_event_loop()
            self.register_signal_handler()
            asyncio.run(self._serve())

    model = build_kserve_model(
        name,
        predictor,
        max_images=config.max_images,
        max_image_pixels=config.max_image_pixels,
        max_batch=config.max_batch,
    )
    model.load()
    predictor.start_watching()
    model_server.app.add_middleware(RequestSizeLimit, max_bytes=config.max_request_bytes)
    _add_status_route(model_server.app, name, predictor)
    server = LoopbackModelServer(
        http_port=config.http_port,
        grpc_port=config.grpc_port,
        enable_grpc=config.enable_grpc,
        grace_period=5,
    )
    _requests_that_fail_to_decode_are_400(server.dataplane)
    log.info(
        "serving %s as %r on http://%s:%d (gRPC %s)",
        predictor.source.uri,
        name,
        config.host,
        config.http_port,
        f"{config.host}:{config.grpc_port}" if config.enable_grpc else "off",
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.start([model])


# -- command line -----------------------------------------------------------------------
def add_serve_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="models:/fod-<category>@champion (follows the alias), models:/NAME/VERSION, "
        "or a model directory",
    )
    parser.add_argument("--name", help="served model name (default: the registered name)")
    parser.add_argument(
        "--model-version", help="version to report when serving a directory (default: its date)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 only inside a pod"
    )
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--no-grpc", action="store_true")
    parser.add_argument(
        "--poll-interval", type=float, default=10.0, help="seconds between alias checks (0: off)"
    )
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20)
    parser.add_argument(
        "--max-images", type=int, default=DEFAULT_MAX_IMAGES, help="images per request"
    )
    parser.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="per image"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=1,
        help="images of concurrent requests per forward pass (1 on CPU; e.g. 16 on a GPU)",
    )


def serve_from_args(args) -> None:
    source = ModelSource(args.model, version=args.model_version)
    if source.is_registry:
        from components.settings import load_settings

        load_settings().export()  # MLflow and its S3 artifact store
    config = ServerConfig(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels,
        max_batch=args.max_batch,
        poll_interval=args.poll_interval,
        enable_grpc=not args.no_grpc,
    )
    predictor = FODPredictor(source, poll_interval=args.poll_interval)
    serve(args.name or source.model_name, predictor, config)


def main(argv: list[str] | None = None) -> None:
    """``python -m components.serving``: what ``fod serve`` runs (and the pod's command)."""
    import argparse

    from fod_core.runtime import configure_cpu_numerics

    configure_cpu_numerics()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser(prog="fod serve", description=__doc__.split("\n")[0])
    add_serve_arguments(parser)
    serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
