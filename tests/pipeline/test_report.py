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


def test_the_report_says_what_more_good_parts_would_change(tmp_path):
    from fod_core.evaluate import more_normals

    scores = np.arange(1.0, 21.0)
    threshold = calibrate_threshold(scores, target_false_alarm_rate=0.05)
    calibration = threshold.to_dict() | {"validation_scores": list(scores)}
    defects = np.array([19.75, 19.9, 20.5, 30.0])
    metrics = {
        "evidence": "labelled",
        "calibration": calibration,
        "catch_rate": 0.5,
        "defects_caught": 2,
        "n_anomalous": 4,
        "more_normals": more_normals(calibration, defects),
    }
    target = tmp_path / "report.html"
    write_html_report(metrics, tmp_path, target, "widget")
    page = target.read_text()
    assert "More good parts behind the threshold" in page and "fod calibrate --normals" in page
    assert "25 more good parts (45), asking at most 5%" in page
    assert "the catch rate would not rise (today 50%)" in page
    assert "catching about 75% of the test&#x27;s labelled defects (today 50%)" in page


def test_the_report_names_the_recipe_and_its_evidence_in_words() -> None:
    from components.evaluation import recipe_section

    recipe = {
        "chosen": {"alignment": "none", "reference_k": 5, "retrieval_window": -1},
        "planted_caught_above_normals": 0.8958,
        "planted_images": 48,
        "planted_image_auroc": 0.9935,
        "choice_images": 16,
        "tail_normals": 50,
        "candidates": 80,
        "rule": "the most planted copies above every normal",
    }
    section = recipe_section(recipe)
    assert "retrieval_window any position" in section and "-1" not in section
    assert "89.6% of 48 planted copies above every normal" in section
    assert recipe_section(None) == ""
