"""The request and response forms: v1/v2 decoding, request options, per-image results."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from enum import Enum

import numpy as np

from fod_core.inference import AnomalyDetector, Prediction
from fod_core.processing import ImageDecodeError, read_image
from fod_core.visualize import prediction_overlay

DEFAULT_MAX_IMAGES = 32
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000  # 5000 x 5000; a 900x900 MVTec image is 0.8 MPixel
DEFAULT_GRID_SIZE = 32


class InvalidRequest(ValueError):
    """A client's mistake: answered 4xx with this message, never 5xx."""


class UndecodableImage(InvalidRequest):
    """An image in the request that is not a readable image (counted in the metrics)."""


class MapFormat(str, Enum):
    """How (and whether) a response carries each image's anomaly map."""

    NONE = "none"
    PNG = "png"  # the image | heatmap overlay that `fod predict --heatmaps` writes
    GRID = "grid"  # the map averaged down to grid_size x grid_size floats


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


@dataclass
class ImageResult:
    score: float
    is_anomalous: bool | None
    threshold: float | None
    anomaly_map_png: bytes | None = None
    anomaly_map_grid: np.ndarray | None = None
    anomaly_map: np.ndarray | None = None  # the full map, for the decision record only


def decode_images(images: list[bytes], *, max_image_pixels: int) -> list:
    """Encoded bytes -> RGB images; a bad one is the client's mistake (4xx) and names its index."""
    decoded = []
    for index, data in enumerate(images):
        try:
            decoded.append(read_image(data, max_pixels=max_image_pixels))
        except ImageDecodeError as error:
            message = str(error).removeprefix("<bytes>: ")
            raise UndecodableImage(f"image {index}: {message}") from None
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
        result.anomaly_map = prediction.anomaly_map
        if options.anomaly_map is MapFormat.PNG:
            buffer = io.BytesIO()
            prediction_overlay(image, prediction.anomaly_map, threshold).save(buffer, "PNG")
            result.anomaly_map_png = buffer.getvalue()
        elif options.anomaly_map is MapFormat.GRID:
            result.anomaly_map_grid = detector.post.grid(prediction.anomaly_map, options.grid_size)
        results.append(result)
    return results
