"""The kserve.Model that answers v1 and v2 predict requests through the predictor and scorer."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import numpy as np

from components.serving import metrics
from components.serving.predictor import FODPredictor
from components.serving.protocol import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    ImageResult,
    InvalidRequest,
    MapFormat,
    RequestOptions,
    UndecodableImage,
    decode_v1_instances,
    decode_v2_inputs,
)
from components.serving.records import DecisionLog, Served
from components.serving.scorer import BatchScorer
from components.serving.source import LoadedModel

log = logging.getLogger(__name__)


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


def build_kserve_model(
    name: str,
    predictor: FODPredictor,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_batch: int = 1,
    recorder: DecisionLog | None = None,
):
    """The kserve.Model around a predictor (kserve is imported here, not at module import).
    Every decision is counted in the metrics and, with a ``recorder``, recorded."""
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
            self._last_version: str | None = None
            if recorder is not None:  # read when scraped, not only when a request comes
                for state in recorder.counts:
                    metrics.RECORDS.labels(name, state).set_function(
                        lambda state=state: recorder.counts[state]
                    )
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
            started = time.perf_counter()
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
                if isinstance(error, UndecodableImage):
                    metrics.DECODE_ERRORS.labels(self.name).inc()
                raise InvalidInput(str(error)) from None
            self._account(model, images, results, time.perf_counter() - started)
            if isinstance(payload, InferRequest):
                return self._v2_response(payload, model, results, options)
            return {"predictions": [self._v1_item(model, r) for r in results]}

        def _account(self, model: LoadedModel, images, results, seconds: float) -> None:
            """Metrics and the decision record; neither may fail the request."""
            try:
                scores = [r.score for r in results]
                metrics.observe(self.name, model.version, scores, [r.is_anomalous for r in results])
                metrics.LATENCY.labels(self.name, model.version).observe(seconds)
                if model.version != self._last_version:
                    metrics.served(self.name, model.version, self._last_version)
                    self._last_version = model.version
                if recorder is not None:
                    recorder.submit(
                        [
                            Served(image, r.score, r.threshold, r.is_anomalous,
                                   r.anomaly_map if r.is_anomalous else None,
                                   self.name, model.version, model.data_version)
                            for image, r in zip(images, results, strict=True)
                        ]
                    )  # fmt: skip
            except Exception:  # pragma: no cover - accounting must never fail a request
                log.exception("could not account for a request")

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
            if recorder is not None:
                recorder.close()
            super().stop()

    return FODKServeModel()
