"""``fod monitor`` on recorded decisions: parts like the training ones are no drift, parts
from another distribution (brighter light) are, with its numbers, a picture and exit 3."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.monitoring import MonitorError, monitor
from components.serving.records import DecisionLog, KeepImages, RecordSettings, Served
from fod_core.artifact import load_detector
from fod_core.synthetic import make_synthetic_dataset
from pipelines.cli import main


@pytest.fixture(scope="module")
def new_parts(tmp_path_factory) -> list:
    """Good parts made like the training ones, but new (another seed)."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("new-parts"), "widget", n_train=40, size=64, seed=11
    )
    return sorted((root / "widget" / "train" / "good").glob("*.png"))


def record(model_dir, images: list[Image.Image], path, *, flag_all: bool = False) -> dict:
    """Record the model's decisions on ``images`` (``flag_all``: every part an alarm, as a
    line with many alarms); returns the record's counts."""
    detector = load_detector(model_dir)
    log = DecisionLog(RecordSettings(path, KeepImages.NONE))
    encoded = []
    for image in images:
        from io import BytesIO

        buffer = BytesIO()
        image.save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    predictions = detector.predict(images)
    log.submit(
        [
            Served(data, p.score, detector.post.threshold, flag_all or p.is_anomalous, None,
                   "fod-widget", "1", "abc")
            for data, p in zip(encoded, predictions, strict=True)
        ]
    )  # fmt: skip
    log.close()
    return log.counts


def test_parts_like_the_training_ones_are_no_drift(model_a, new_parts, tmp_path) -> None:
    path = tmp_path / "normal.sqlite"
    record(model_a, [Image.open(p).convert("RGB") for p in new_parts], path)
    report = monitor("widget", record=path, model_dir=model_a, track=False)
    (entry,) = report["versions"]
    assert report["drift"] is False, entry["verdict"]
    assert entry["n_decisions"] == 40 and entry["verdict"].startswith("no drift")


def test_brighter_light_is_drift_with_its_numbers(model_a, new_parts, tmp_path) -> None:
    path = tmp_path / "bright.sqlite"
    brighter = [
        Image.fromarray(np.clip(np.asarray(Image.open(p).convert("RGB")) * 1.8, 0, 255).astype(
            np.uint8))
        for p in new_parts
    ]  # fmt: skip
    record(model_a, brighter, path)
    plot = tmp_path / "drift.png"
    report = monitor("widget", record=path, model_dir=model_a, plot=plot, track=False)
    (entry,) = report["versions"]
    assert report["drift"] is True and entry["verdict"].startswith("DRIFT")
    assert entry["ks_p_value"] < 0.01 and "scores shifted" in entry["verdict"]
    assert plot.is_file() and entry["plot"] == str(plot)
    argv = ["monitor", "--category", "widget", "--record", str(path), "--model", str(model_a)]
    assert main([*argv, "--no-track"]) == 3


def test_no_record_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(MonitorError, match="no decision record"):
        monitor("widget", record=tmp_path / "missing.sqlite", track=False)


def test_alarms_are_tested_against_the_promise_only_once_reviewed(model_a, new_parts, tmp_path):
    """Every part flagged (a line with many alarms): unreviewed, the alarms may be real
    defects and nothing is called broken; once a reviewer confirms them good, they are
    false alarms far beyond the promise, and the verdict says which evidence it used."""
    from components.review import ReviewStore

    images = [Image.open(p).convert("RGB") for p in new_parts]
    path = tmp_path / "flagged.sqlite"
    counts = record(model_a, images, path, flag_all=True)
    assert counts["recorded"] == len(images), counts
    (unreviewed,) = monitor("widget", record=path, model_dir=model_a, track=False)["versions"]
    assert unreviewed["drift"] is False and unreviewed["false_alarm_p_value"] is None
    assert "not tested against the false-alarm promise" in unreviewed["verdict"]
    store = ReviewStore(path)
    for decision_id in range(1, len(images) + 1):
        store.give(decision_id, "good", "qa")
    (reviewed,) = monitor("widget", record=path, model_dir=model_a, track=False)["versions"]
    assert reviewed["drift"] is True and reviewed["reviewed"] == reviewed["false_alarms"] == 40
    assert reviewed["false_alarm_p_value"] < 0.005
    assert "confirmed false alarms" in reviewed["verdict"]
