"""The KServe model server bound to loopback (or a pod's interface), and its command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from components.errors import ServingError
from components.serving.kserve_model import build_kserve_model, import_kserve
from components.serving.predictor import FODPredictor
from components.serving.protocol import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_REQUEST_BYTES,
)
from components.serving.records import DecisionLog, KeepImages, RecordSettings
from components.serving.source import ModelSource
from fod_core.config import Precision

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8080
# MLflow's client retries while the model server asks the registry (a user's own values win)
POLL_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
DEFAULT_GRPC_PORT = 8081


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
    record: RecordSettings | None = None  # the decision record; None: nothing recorded


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


def _add_status_route(
    app, name: str, predictor: FODPredictor, recorder: DecisionLog | None = None
) -> None:
    """GET /v2/models/NAME/status: which version is served, which is loading, failures,
    and what the decision record wrote, shipped, still has to ship and lost."""

    @app.get(f"/v2/models/{name}/status")
    async def status():
        answer = predictor.status()
        if recorder is not None:
            answer["records"] = {"path": str(recorder.settings.path), **recorder.counts}
            if recorder.settings.ship_to:  # pending, dropped_unshipped: in the counts
                answer["records"]["shipped_to"] = recorder.settings.ship_to
                answer["records"]["max_unshipped"] = recorder.settings.unshipped_cap
        return answer


class DroppedDecisions:
    """Prometheus ``fod_decisions_dropped_total``: served decisions the record lost, by
    reason, read from the record's counts when scraped, so it always agrees with /status.
    ``unshipped_over_cap``: deleted before S3 had them (over ``--max-unshipped``)."""

    REASONS = (  # (label, key in the record's counts)
        ("queue_full", "dropped"), ("write_failed", "failed"),
        ("unshipped_over_cap", "dropped_unshipped"),
    )  # fmt: skip

    def __init__(self, model: str, recorder: DecisionLog) -> None:
        self.model, self.recorder = model, recorder

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "fod_decisions_dropped", "Served decisions the decision record lost, by reason",
            labels=["model", "reason"],
        )  # fmt: skip
        for reason, key in self.REASONS:
            if key in self.recorder.counts:
                family.add_metric([self.model, reason], self.recorder.counts[key])
        yield family


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

    recorder = None
    if config.record:
        from prometheus_client import REGISTRY

        from components.serving.shipping import shipper_for

        recorder = DecisionLog(config.record, shipper=shipper_for(config.record))
        REGISTRY.register(DroppedDecisions(name, recorder))
    model = build_kserve_model(
        name,
        predictor,
        max_images=config.max_images,
        max_image_pixels=config.max_image_pixels,
        max_batch=config.max_batch,
        recorder=recorder,
    )
    model.load()
    predictor.start_watching()
    model_server.app.add_middleware(RequestSizeLimit, max_bytes=config.max_request_bytes)
    _add_status_route(model_server.app, name, predictor, recorder)
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
        "--runtime",
        default=os.environ.get("FOD_RUNTIME", "torch"),
        choices=["torch", "onnx", "openvino"],
        help="what scores: PyTorch, or the model's export that passed its parity check "
        "(`fod export`; the pipeline exports before registering); env FOD_RUNTIME",
    )
    parser.add_argument(
        "--precision",
        default=os.environ.get("FOD_PRECISION", "fp32"),
        choices=[p.value for p in Precision],
        help="PyTorch's precision: fp32, bf16, or auto (bf16 where the CPU or GPU has it "
        "natively and the model passed `fod export --format bf16`); env FOD_PRECISION",
    )
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
        "--record",
        help="SQLite file of the decision record (every served decision; off when unset)",
    )
    parser.add_argument(
        "--keep-images",
        choices=[k.value for k in KeepImages],
        default=KeepImages.FLAGGED.value,
        help="full images the record keeps (thumbnails always; overlays of flagged ones)",
    )
    parser.add_argument(
        "--max-records",
        type=int,
        default=100_000,
        help="the oldest beyond this are deleted; with --ship-to only shipped ones",
    )
    parser.add_argument(
        "--max-unshipped",
        type=int,
        help="with --ship-to: the most decisions not yet shipped the record keeps during an "
        "S3 outage (default: twice --max-records); older ones are dropped and counted",
    )
    parser.add_argument(
        "--ship-to",
        help="with --record: ship it to this S3 location as Parquet (s3://bucket/prefix), "
        "where fod monitor and fod review read it on a cluster",
    )
    parser.add_argument(
        "--ship-interval", type=float, default=60.0, help="seconds between shipments"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=1,
        help="images of concurrent requests per forward pass (1 on CPU; e.g. 16 on a GPU)",
    )


def serve_from_args(args) -> None:
    if args.ship_to and not args.record:
        raise ServingError("--ship-to ships the decision record: give --record PATH too")
    if args.ship_to:
        from components.serving.shipping import S3Location

        S3Location.parse(args.ship_to)  # a wrong location fails now, not at the first shipment
    source = ModelSource(
        args.model, version=args.model_version, runtime=args.runtime, precision=args.precision
    )
    if source.is_registry:
        from components.settings import load_settings

        load_settings().export()  # MLflow and its S3 artifact store
        # an alias check against a registry that is down fails in seconds (MLflow's default
        # retries for minutes); the served model stays, the next poll tries again
        for key, value in POLL_RETRY_ENV.items():
            os.environ.setdefault(key, value)
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
        record=RecordSettings(
            Path(args.record),
            KeepImages(args.keep_images),
            max_records=args.max_records,
            max_unshipped=args.max_unshipped,
            ship_to=args.ship_to,
            ship_interval=args.ship_interval,
        )
        if args.record
        else None,
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
