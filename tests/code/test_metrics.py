"""Metrics against sklearn and brute-force references on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from fod_core.calibration import ThresholdMode, calibrate_threshold
from fod_core.metrics import area_to, aupro, compute_metrics, f1_max, image_auroc, pixel_auroc


def random_case(seed: int, n: int = 6, size: int = 24):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n // 2, n):  # second half anomalous, 1-2 blobs each
        for _ in range(rng.integers(1, 3)):
            y, x = rng.integers(2, size - 8, 2)
            h, w = rng.integers(2, 7, 2)
            masks[i, y : y + h, x : x + w] = 1
    maps = rng.normal(0, 1, masks.shape) + 1.5 * masks + rng.normal(0, 0.5, masks.shape) * masks
    return masks, np.round(maps, 2)  # rounding makes ties, which must be handled


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Threshold by threshold, region by region, as the metric is defined."""
    regions = []
    for i in range(len(masks)):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append((above & normal).sum() / normal.sum())
        pros.append(np.mean([above[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    # integrate to `limit` with linear interpolation at the limit
    keep = fprs <= limit
    x, y = fprs[keep], pros[keep]
    if x[-1] < limit and (~keep).any():
        j = np.argmax(~keep)
        y_at = np.interp(limit, [fprs[j - 1], fprs[j]], [pros[j - 1], pros[j]])
        x, y = np.r_[x, limit], np.r_[y, y_at]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / limit)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed):
    masks, maps = random_case(seed)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


def test_aupro_extremes():
    masks, maps = random_case(0)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, -masks.astype(float)) < 0.01
    assert aupro(np.zeros_like(masks), maps) is None


def test_pixel_and_image_auroc_match_sklearn():
    masks, maps = random_case(3)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    labels = masks.reshape(len(masks), -1).max(1)
    scores = maps.reshape(len(maps), -1).max(1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert image_auroc([0, 0], [0.1, 0.2]) is None


def test_f1_max_matches_a_threshold_sweep():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 40)
    scores = rng.normal(0, 1, 40) + labels
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    value, threshold = f1_max(labels, scores)
    assert value == pytest.approx(best)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best)


def test_area_to_interpolates_at_the_limit():
    x, y = np.array([0.0, 0.2, 0.4]), np.array([0.0, 1.0, 1.0])
    assert area_to(x, y, 0.3) == pytest.approx(0.1 + 0.1)


def test_compute_metrics_breakdown_and_confusion():
    masks, maps = random_case(4, n=8)
    labels = masks.reshape(8, -1).max(1)
    scores = maps.reshape(8, -1).max(1)
    types = ["good"] * 4 + ["crack", "crack", "dent", "dent"]
    result = compute_metrics(labels, scores, types, masks, maps, threshold=float(np.median(scores)))
    assert set(result["per_defect_type"]) == {"crack", "dent"}
    assert result["per_defect_type"]["crack"]["n_images"] == 2
    confusion = result["confusion"]
    assert sum(confusion.values()) == 8
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0 <= result[key] <= 1


def test_threshold_calibration_modes():
    normal = np.linspace(0, 1, 101)
    quantile = calibrate_threshold(normal, target_false_alarm_rate=0.05)
    assert quantile.mode is ThresholdMode.FALSE_ALARM_RATE
    assert np.mean(normal >= quantile.value) <= 0.06
    f1 = calibrate_threshold([0.1, 0.2, 0.3], [0.8, 0.9])
    assert f1.mode is ThresholdMode.F1
    assert 0.3 < f1.value <= 0.8
    with pytest.raises(ValueError, match="normal"):
        calibrate_threshold([])
    with pytest.raises(ValueError, match="anomalous"):
        calibrate_threshold([0.1], mode="f1")


def test_catch_rate_at_the_shipped_threshold():
    """What the line sees: defects caught at the threshold the model ships with. All
    caught, none caught, and a case checked by hand (per defect type too)."""
    from fod_core.metrics import compute_metrics

    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1]
    types = ["good"] * 4 + ["scratch", "scratch", "dent", "dent", "dent"]
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.35, 0.45, 0.9, 0.25]
    every = compute_metrics(labels, scores, types, threshold=0.2)
    assert every["defects_caught"] == 5 and every["catch_rate"] == 1.0
    none = compute_metrics(labels, scores, types, threshold=1.0)
    assert none["defects_caught"] == 0 and none["catch_rate"] == 0.0
    # by hand at 0.4: scratch 0.5 caught, 0.35 missed; dent 0.45 and 0.9 caught, 0.25 missed
    mid = compute_metrics(labels, scores, types, threshold=0.4)
    assert mid["defects_caught"] == 3 and mid["catch_rate"] == 3 / 5
    assert mid["per_defect_type"]["scratch"] | {} == {**mid["per_defect_type"]["scratch"],
                                                       "caught": 1, "catch_rate": 0.5}  # fmt: skip
    assert mid["per_defect_type"]["dent"]["caught"] == 2
    assert mid["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 2}  # 0.4 is a false alarm
    # for the record, from the test normals' own curve: at 0% of 4 normals above (rate
    # 0.01), defects above the highest normal 0.4: 0.5, 0.45, 0.9
    assert mid["catch_rate_at_test_far"]["0.01"] == 3 / 5
    assert compute_metrics([0, 1], [0.1, 0.2], ["good", "d"])["catch_rate_at_test_far"] == {
        "0.01": 1.0,
        "0.05": 1.0,
    }


def test_the_catch_line_says_what_the_line_sees():
    from components.evaluation import catch_line

    labelled = {"catch_rate": 0.34, "defects_caught": 22, "n_anomalous": 65,
                "false_alarm_rate": 0.0, "false_alarms": 0, "n_normal": 22}  # fmt: skip
    assert catch_line(labelled) == (
        "At the shipped threshold: caught 22 of 65 labelled defects (34%); "
        "0 false alarms in 22 test normals"
    )
    planted = {"planted_detected": 0.5, "n_planted": 24}
    assert "caught 50% of 24 planted anomalies (no labelled defects)" in catch_line(planted)
