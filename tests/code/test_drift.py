"""``check_drift`` by simulation: a healthy model is reported in drift at most ``alpha`` of
the time (with and without reviews), a line that makes more defects than the promised
false-alarm rate is not drift, and a shifted model is caught (power stated)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fod_core.calibration import calibrate_threshold
from fod_core.drift import ALPHA, check_drift

TRIALS = 1500


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # calibrate_threshold warns on few normals
    yield
    logging.disable(logging.NOTSET)


def run(rng, *, n_cal=21, served=2000, shift=0.0, defect_rate=0.0, review=0.0, trials=TRIALS):
    """Share of trials reported in drift. Calibration normals N(0, 1); served normals
    N(shift, 1); defects N(4, 1) at ``defect_rate``; every alarm and ``review`` of the
    other parts get a reviewer's (true) verdict."""
    drifted = 0
    for _ in range(trials):
        calibration = rng.normal(size=n_cal)
        threshold = calibrate_threshold(calibration, target_false_alarm_rate=0.01)
        defective = rng.random(served) < defect_rate
        scores = np.where(defective, rng.normal(4, 1, served), rng.normal(shift, 1, served))
        alarms = scores >= threshold.value
        verdicts = None
        if review:
            reviewed = alarms | (rng.random(served) < review)
            verdicts = [
                ("defective" if d else "good") if r else None
                for d, r in zip(defective, reviewed, strict=True)
            ]
        check = check_drift(
            scores,
            alarms,
            calibration,
            threshold.guaranteed_false_alarm_rate,
            rank=threshold.rank,
            verdicts=verdicts,
        )
        drifted += check.drift
    return drifted / trials


LIMIT = ALPHA + 3 * (ALPHA * (1 - ALPHA) / TRIALS) ** 0.5


@pytest.mark.parametrize(("n_cal", "served"), [(21, 2000), (10, 200), (100, 1000)])
def test_a_healthy_model_is_in_drift_at_most_alpha_of_the_time(n_cal, served):
    """The issue measured 32% with the binomial alarm test (21 normals, 2,000 parts)."""
    rng = np.random.default_rng(n_cal)
    assert run(rng, n_cal=n_cal, served=served) <= LIMIT
    assert run(rng, n_cal=n_cal, served=served, review=0.05) <= LIMIT


def test_more_defects_than_the_promise_is_not_drift():
    """5% defects against a false-alarm promise of about 10%: without reviews the alarms
    are reported, not tested; with reviews the confirmed defects are left out."""
    rng = np.random.default_rng(2)
    assert run(rng, defect_rate=0.05, trials=500) <= LIMIT
    assert run(rng, defect_rate=0.2, review=0.02, trials=500) <= LIMIT


def test_a_shifted_model_is_caught():
    """Normal parts scoring one standard deviation higher than the calibration normals
    (new light, a worn lens): the score test catches it in most trials."""
    rng = np.random.default_rng(3)
    assert run(rng, shift=1.0, trials=300) > 0.9
    assert run(rng, shift=1.0, review=0.05, trials=300) > 0.8  # each test at alpha / 2


def test_the_verdict_says_which_evidence_it_used():
    rng = np.random.default_rng(4)
    calibration = rng.normal(size=21)
    threshold = calibrate_threshold(calibration, target_false_alarm_rate=0.01)
    scores = rng.normal(size=500)
    alarms = scores >= threshold.value
    plain = check_drift(scores, alarms, calibration, 0.1, rank=threshold.rank)
    assert plain.false_alarm_p_value is None
    assert "not tested against the false-alarm promise (no reviewed verdict" in plain.verdict()
    # every alarm confirmed good and far more of them than the calibration allows
    many = scores >= np.quantile(scores, 0.5)
    verdicts = ["good" if a else None for a in many]
    broken = check_drift(scores, many, calibration, 0.1, rank=threshold.rank, verdicts=verdicts)
    assert broken.drift and broken.false_alarm_p_value < ALPHA / 2
    assert "confirmed false alarms" in broken.verdict()
    assert any(e.startswith("false alarms:") for e in broken.evidence)
