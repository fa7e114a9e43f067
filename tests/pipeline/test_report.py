"""The evaluation's HTML report states the threshold's promise in words and the splits'
roles, so a quality engineer reads what the alarms mean without the JSON."""

from __future__ import annotations

import numpy as np

from components.evaluation import write_html_report
from fod_core.calibration import calibrate_threshold


def test_the_report_states_the_promise_and_the_roles(tmp_path):
    threshold = calibrate_threshold(np.arange(140.0), target_false_alarm_rate=0.02)
    metrics = {
        "evidence": "planted",
        "splits": {"train": 100, "validation_choice": 10, "validation_calibration": 140},
        "calibration": threshold.to_dict(),
    }
    target = tmp_path / "report.html"
    write_html_report(metrics, tmp_path, target, "widget")
    page = target.read_text()
    promise = "The threshold promises: at most 1.6% false alarms, with 90% confidence, from 140"
    assert promise in page
    assert "its calibration part alone sets the threshold" in page
    assert "<td>validation_calibration</td><td>140</td>" in page
