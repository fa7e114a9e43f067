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
