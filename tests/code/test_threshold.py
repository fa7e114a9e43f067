"""The conformal threshold rule: with n validation normals and a target rate, the k-th
largest score is the threshold and k / (n + 1) the guaranteed false-alarm rate."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fod_core.calibration import ThresholdMode, calibrate_threshold, normals_needed


@pytest.mark.parametrize(
    ("n", "target", "k"),
    [(16, 0.01, 1), (99, 0.01, 1), (199, 0.01, 2), (209, 0.05, 10), (20, 0.05, 1), (40, 0.1, 4)],
)
def test_rank_and_guarantee_against_a_direct_computation(n, target, k):
    scores = np.random.default_rng(n).normal(size=n)
    threshold = calibrate_threshold(scores, target_false_alarm_rate=target)
    # direct: the largest k with k/(n+1) <= target (at least 1), the k-th largest score
    direct_k = max([j for j in range(1, n + 1) if j / (n + 1) <= target + 1e-12] or [1])
    assert direct_k == k == threshold.rank
    assert threshold.value == sorted(scores, reverse=True)[k - 1]
    assert threshold.guaranteed_false_alarm_rate == pytest.approx(k / (n + 1))
    assert threshold.mode is ThresholdMode.FALSE_ALARM_RATE
    assert threshold.supports_target == (1 / (n + 1) <= target)


def test_the_promise_holds_on_fresh_normals():
    """Over many draws of n validation and fresh normal scores, the rate of fresh scores at
    or above the threshold stays at k / (n + 1), for any score distribution."""
    rng = np.random.default_rng(0)
    n, target, rates = 59, 0.05, []
    for _ in range(2000):
        threshold = calibrate_threshold(rng.lognormal(size=n), target_false_alarm_rate=target)
        rates.append(np.mean(rng.lognormal(size=50) >= threshold.value))
    assert threshold.guaranteed_false_alarm_rate == pytest.approx(3 / 60)
    assert abs(np.mean(rates) - 3 / 60) < 0.005  # the bound is tight for continuous scores


def test_too_few_normals_warn_with_what_is_needed(caplog):
    with caplog.at_level(logging.WARNING, logger="fod_core.calibration"):
        threshold = calibrate_threshold(np.arange(16.0), target_false_alarm_rate=0.01)
    assert threshold.value == 15.0 and not threshold.supports_target
    assert threshold.guaranteed_false_alarm_rate == pytest.approx(1 / 17)
    assert "16 validation normals cannot promise a 0.01" in caplog.text
    assert "99 validation normals are needed" in caplog.text
    assert normals_needed(0.01) == 99 and normals_needed(0.05) == 19
    assert "at most 0.05882" in threshold.describe()
