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
