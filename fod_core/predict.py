"""Lifecycle stage 'predict': score images with a model artefact, optionally save heatmaps."""

from __future__ import annotations

from pathlib import Path

from fod_core.artifact import read_manifest
from fod_core.calibration import promise_of
from fod_core.export import load_runtime
from fod_core.processing import read_image
from fod_core.visualize import prediction_overlay


def predict_images(
    model_dir: str | Path,
    images: list[str | Path],
    *,
    heatmap_dir: str | Path | None = None,
    device: str = "cpu",
    runtime: str = "torch",
    precision: str = "fp32",
) -> list[dict]:
    """One dict per image: path, score, is_anomalous, threshold, what the threshold
    promises (and heatmap path).
    ``runtime``: torch, or a checked export (onnx, openvino; ``fod export``);
    ``precision``: fp32, bf16 or auto (torch only; see ``load_detector``)."""
    detector = load_runtime(model_dir, runtime, device=device, precision=precision)
    predictions = detector.predict([Path(p) for p in images])
    promise = promise_of(read_manifest(model_dir))
    results = []
    for path, prediction in zip(images, predictions, strict=True):
        entry = {"path": str(path), **prediction.to_dict(), "threshold": detector.post.threshold}
        entry["promise"] = promise
        if heatmap_dir is not None:
            target = Path(heatmap_dir) / f"{Path(path).stem}_heatmap.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image = read_image(path)
            prediction_overlay(image, prediction.anomaly_map, detector.post.threshold).save(target)
            entry["heatmap"] = str(target)
        results.append(entry)
    return results
