"""Alarm threshold from validation scores, never from test labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from fod_core.metrics import f1_max


class ThresholdMode(str, Enum):
    FALSE_ALARM_RATE = "false_alarm_rate"  # quantile of normal scores; needs no anomalies
    F1 = "f1"  # F1-optimal on labelled validation anomalies


@dataclass(frozen=True)
class Threshold:
    value: float
    mode: ThresholdMode
    target_false_alarm_rate: float | None = None
    n_normal: int = 0
    n_anomalous: int = 0

    def to_dict(self) -> dict:
        return {
            "threshold": self.value,
            "threshold_mode": self.mode.value,
            "target_false_alarm_rate": self.target_false_alarm_rate,
            "n_normal": self.n_normal,
            "n_anomalous": self.n_anomalous,
        }


def calibrate_threshold(
    normal_scores: Sequence[float],
    anomalous_scores: Sequence[float] = (),
    *,
    target_false_alarm_rate: float = 0.01,
    mode: ThresholdMode | str | None = None,
) -> Threshold:
    """Quantile of normal validation scores by default; F1-optimal when anomalies exist
    (or when asked). With few normal images the quantile is their maximum."""
    normal = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.asarray(anomalous_scores, dtype=np.float64)
    if normal.size == 0:
        raise ValueError("threshold calibration needs validation scores of normal images")
    if not 0 <= target_false_alarm_rate < 1:
        raise ValueError("target false-alarm rate must be in [0, 1)")
    if mode is None:
        mode = ThresholdMode.F1 if anomalous.size else ThresholdMode.FALSE_ALARM_RATE
    mode = ThresholdMode(mode)
    if mode is ThresholdMode.F1:
        if anomalous.size == 0:
            raise ValueError("F1 calibration needs labelled anomalous validation images")
        labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
        _, value = f1_max(labels, np.r_[normal, anomalous])
        return Threshold(float(value), mode, None, int(normal.size), int(anomalous.size))
    value = float(np.quantile(normal, 1.0 - target_false_alarm_rate, method="higher"))
    return Threshold(value, mode, target_false_alarm_rate, int(normal.size), 0)


def calibrate_model(
    model_dir,
    data_root,
    category: str,
    *,
    format: str = "mvtec",
    mode: ThresholdMode | str | None = None,
    target_false_alarm_rate: float = 0.01,
    anomalous_images: Sequence = (),
    progress: bool = False,
) -> Threshold:
    """Lifecycle stage 'calibrate': re-derive a model's threshold and store it in the artefact.

    Normal scores come from the validation split the model was trained with (the same
    file-name hash split, so no image the model trained on is used); labelled anomalies,
    when given, are validation anomalies supplied by the user, never the test set.
    """
    from fod_core.artifact import load_detector, read_manifest, update_manifest
    from fod_core.data import load_category, split_validation

    manifest = read_manifest(model_dir)
    val_fraction = manifest.get("training", {}).get("config", {}).get("val_fraction", 0.1)
    data = load_category(data_root, category, format)
    train_records, val_records = split_validation(data.train, val_fraction)
    calibration_records = val_records or train_records
    detector = load_detector(model_dir)
    normal = [p.score for p in detector.predict([r.path for r in calibration_records])]
    anomalous = (
        [p.score for p in detector.predict(list(anomalous_images))] if anomalous_images else []
    )
    threshold = calibrate_threshold(
        normal, anomalous, target_false_alarm_rate=target_false_alarm_rate, mode=mode
    )
    post = {**manifest["postprocessing"], "threshold": threshold.value}
    post["threshold_mode"] = threshold.mode.value
    update_manifest(
        model_dir,
        postprocessing=post,
        calibration={
            **threshold.to_dict(),
            "validation_scores": normal,
            "anomalous_scores": anomalous,
            "calibrated_on": "validation split" if val_records else "training images",
        },
    )
    return threshold
