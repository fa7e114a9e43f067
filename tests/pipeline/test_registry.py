"""Promotion gates: absolute minimums and 'not worse than the champion'."""

from __future__ import annotations

from components.registry import PromotionGates, check_gates

GOOD = {"image_auroc": 0.99, "pixel_auroc": 0.97, "aupro": 0.9}


def test_first_model_passes_minimums():
    assert check_gates(GOOD, PromotionGates(min_image_auroc=0.95), None) == (True, [])


def test_below_minimum_is_refused_with_a_reason():
    passed, reasons = check_gates(
        {**GOOD, "image_auroc": 0.8}, PromotionGates(min_image_auroc=0.9), None
    )
    assert not passed and reasons == ["image_auroc 0.8000 below the minimum 0.9000"]


def test_worse_than_champion_is_refused():
    passed, reasons = check_gates(
        {**GOOD, "pixel_auroc": 0.96}, PromotionGates(min_image_auroc=0.5), GOOD
    )
    assert not passed and "worse than the champion" in reasons[0]
    assert check_gates(GOOD, PromotionGates(), GOOD)[0]  # equal is not worse


def test_missing_metric_only_fails_when_a_minimum_is_set():
    unlabelled = {"image_auroc": 0.95, "pixel_auroc": None, "aupro": None}
    assert check_gates(unlabelled, PromotionGates(min_image_auroc=0.9), None)[0]
    assert not check_gates(unlabelled, PromotionGates(min_pixel_auroc=0.9), None)[0]


GOOD_ONLY = {
    "evidence": "planted",
    "image_auroc": None,
    "n_anomalous": 0,
    "planted_image_auroc": 0.97,
    "planted_aupro": 0.8,
    "false_alarm_rate": 0.0,
    "false_alarms": 0,
    "n_normal": 8,
    "promised_false_alarm_rate": 1 / 6,
    "false_alarm_p_value": 1.0,
}


def test_good_only_models_pass_on_planted_anomalies_not_on_labelled_metrics():
    """Without labelled defects the labelled minimums do not apply (they once failed every
    good-only model); the planted-anomaly minimums do."""
    assert check_gates(GOOD_ONLY, PromotionGates(min_image_auroc=0.9), None) == (True, [])
    passed, reasons = check_gates(
        {**GOOD_ONLY, "planted_image_auroc": 0.6}, PromotionGates(min_planted_image_auroc=0.8), None
    )
    assert not passed and reasons == ["planted_image_auroc 0.6000 below the minimum 0.8000"]


def test_worse_on_the_planted_set_than_the_champion_is_refused():
    passed, reasons = check_gates({**GOOD_ONLY, "planted_aupro": 0.7}, PromotionGates(), GOOD_ONLY)
    assert not passed and reasons == ["planted_aupro 0.7000 worse than the champion's 0.8000"]
    # labelled metrics decide when labelled defects exist, planted ones are not compared
    labelled = {**GOOD, "evidence": "labelled", "planted_aupro": 0.1}
    assert check_gates(labelled, PromotionGates(), {**GOOD, "planted_aupro": 0.9})[0]


def test_planted_metrics_of_another_planting_are_not_compared():
    """Small anomalies on the part are another test than large ones anywhere: a version
    planted another way than the champion is held to the minimums only."""
    part = {**GOOD_ONLY, "planting": "part", "planted_aupro": 0.3}
    assert check_gates(part, PromotionGates(), GOOD_ONLY) == (True, [])
    assert not check_gates(part, PromotionGates(), {**GOOD_ONLY, "planting": "part"})[0]
    assert not check_gates(part, PromotionGates(min_planted_aupro=0.5), GOOD_ONLY)[0]


def test_false_alarms_beyond_the_promise_are_refused():
    """5 alarms in 20 held-out normals when 1/21 was promised: binomial p about 0.002."""
    from scipy.stats import binom

    p_value = float(binom.sf(4, 20, 1 / 21))
    noisy = {**GOOD_ONLY, "false_alarms": 5, "n_normal": 20, "false_alarm_rate": 0.25}
    noisy |= {"promised_false_alarm_rate": 1 / 21, "false_alarm_p_value": p_value}
    passed, reasons = check_gates(noisy, PromotionGates(), None)
    assert not passed and "5 false alarms in 20 held-out normals" in reasons[0]
    # one alarm in 20 at a promised 1/21 is what the promise allows
    one = noisy | {"false_alarms": 1, "false_alarm_p_value": float(binom.sf(0, 20, 1 / 21))}
    assert check_gates(one, PromotionGates(), None)[0]
