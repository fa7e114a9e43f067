"""Lifecycle stage 'evaluate': test metrics, plots and heatmap overlays of a model."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fod_core.artifact import load_detector
from fod_core.data import DatasetError, DatasetFormat, ImageRecord, load_category
from fod_core.inference import AnomalyDetector
from fod_core.metrics import compute_metrics, roc_points
from fod_core.processing import read_image, read_mask
from fod_core.visualize import overlay, plot_roc, plot_score_histogram

log = logging.getLogger(__name__)


def score_records(
    detector: AnomalyDetector,
    records: list[ImageRecord],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(image scores (N,), anomaly maps (N, S, S)) through the shared inference path."""
    scores, maps = [], []
    bar = tqdm(total=len(records), desc="scoring", unit="img", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        for prediction in detector.predict([r.path for r in chunk], batch_size=batch_size):
            scores.append(prediction.score)
            maps.append(prediction.anomaly_map)
        bar.update(len(chunk))
    bar.close()
    return np.asarray(scores, dtype=np.float64), np.stack(maps).astype(np.float32)


def ground_truth_masks(records: list[ImageRecord], size: int) -> np.ndarray | None:
    """(N, S, S) masks, zeros for normal images; None when an anomaly has no mask."""
    if any(r.label == 1 and r.mask_path is None for r in records):
        return None
    return np.stack(
        [
            read_mask(r.mask_path, size) if r.mask_path else np.zeros((size, size), np.uint8)
            for r in records
        ]
    )


def evaluate_detector(
    detector: AnomalyDetector,
    records: list[ImageRecord],
    out_dir: str | Path,
    *,
    title: str = "",
    max_overlays: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Score ``records`` and write metrics.json, predictions.csv, plots and overlays."""
    if not records:
        raise DatasetError("nothing to evaluate: the test split is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = detector.pre.image_size
    scores, maps = score_records(detector, records, batch_size=batch_size, progress=progress)
    labels = np.array([r.label for r in records])
    types = [r.defect_type for r in records]
    masks = ground_truth_masks(records, size)
    threshold = detector.post.threshold
    metrics = compute_metrics(labels, scores, types, masks, maps, threshold=threshold)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    with open(out_dir / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "defect_type", "label", "score", "is_anomalous"])
        for r, s in zip(records, scores, strict=True):
            decision = "" if threshold is None else int(s >= threshold)
            writer.writerow([str(r.path), r.defect_type, r.label, f"{s:.8g}", decision])

    fpr, tpr = roc_points(labels, scores) if metrics["image_auroc"] is not None else ([], [])
    if len(fpr):
        plot_roc(fpr, tpr, metrics["image_auroc"], out_dir / "roc.png", f"{title} image ROC")
    plot_score_histogram(
        scores, labels, threshold, out_dir / "score_histogram.png", f"{title} test scores"
    )
    _write_overlays(records, scores, maps, masks, out_dir / "overlays", max_overlays)
    return metrics


def _write_overlays(records, scores, maps, masks, folder: Path, limit: int | None) -> None:
    """One image per test image: input | heatmap, on one colour scale for the whole set."""
    vmin, vmax = float(np.percentile(maps, 1)), float(np.percentile(maps, 99.9))
    chosen = range(len(records)) if limit is None else _spread(records, limit)
    for i in chosen:
        record = records[i]
        target = folder / record.defect_type / f"{record.path.stem}_{scores[i]:.4g}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = masks[i] if masks is not None else None
        overlay(read_image(record.path), maps[i], vmin=vmin, vmax=vmax, mask=mask).save(target)


def _spread(records: list[ImageRecord], limit: int) -> list[int]:
    """Up to ``limit`` images spread over the defect types."""
    by_type: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_type.setdefault(r.defect_type, []).append(i)
    chosen: list[int] = []
    while len(chosen) < limit and any(by_type.values()):
        for indices in by_type.values():
            if indices and len(chosen) < limit:
                chosen.append(indices.pop(0))
    return sorted(chosen)


def evaluate_model(
    model_dir: str | Path,
    data_root: str | Path,
    category: str,
    out_dir: str | Path,
    *,
    format: DatasetFormat | str = DatasetFormat.MVTEC,
    device: str = "cpu",
    max_overlays: int | None = None,
    progress: bool = True,
) -> dict:
    detector = load_detector(model_dir, device=device)
    data = load_category(data_root, category, format)
    return evaluate_detector(
        detector, data.test, out_dir, title=category, max_overlays=max_overlays, progress=progress
    )
