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
