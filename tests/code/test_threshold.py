"""The threshold's training-conditional promise: with n calibration normals, the k-th
largest score keeps P(this model's false-alarm rate > alpha) <= delta. Checked against a
direct computation and by simulation on fresh draws (thousands of calibration sets, any
score distribution, small and large n), with a choice step before the threshold."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import stats

from fod_core.calibration import ThresholdMode, calibrate_threshold
from fod_core.data import ImageRecord, split_roles
from fod_core.promise import (
    best_supported_rate,
    false_alarm_p_value,
    normals_needed,
    rank_for,
    rate_bound,
)

DISTRIBUTIONS = {
    "normal": stats.norm(),
    "lognormal": stats.lognorm(1.0),
    "exponential": stats.expon(),
    "beta-skewed": stats.beta(0.5, 3.0),
}


@pytest.mark.parametrize(
    ("n", "alpha", "delta"),
    [(16, 0.01, 0.1), (230, 0.01, 0.1), (500, 0.01, 0.1), (209, 0.05, 0.1), (50, 0.1, 0.05)],
)
def test_rank_against_a_direct_computation(n, alpha, delta):
    scores = np.random.default_rng(n).normal(size=n)
    threshold = calibrate_threshold(scores, target_false_alarm_rate=alpha, delta=delta)
    # direct: P(Beta(k, n+1-k) > alpha) is the chance that fewer than k of n uniforms fall
    # above 1 - alpha, i.e. binom.cdf(k - 1, n, alpha); the largest k with that <= delta
    direct = [k for k in range(1, n + 1) if stats.binom.cdf(k - 1, n, alpha) <= delta]
    k = max(direct) if direct else 1
    assert threshold.rank == k
    assert threshold.value == sorted(scores, reverse=True)[k - 1]
    assert threshold.guaranteed_false_alarm_rate == pytest.approx(
        stats.beta.ppf(1 - delta, k, n + 1 - k)
    )
    assert threshold.mode is ThresholdMode.FALSE_ALARM_RATE
    assert threshold.supports_target == bool(direct)


def _coverage(n: int, alpha: float, delta: float, dist, trials: int, seed: int) -> float:
    """Share of calibration sets whose threshold's true false-alarm rate exceeds the
    promised rate (the promise fails), the true rate read from the distribution."""
    rng = np.random.default_rng(seed)
    fails = 0
    for _ in range(trials):
        threshold = calibrate_threshold(
            dist.rvs(size=n, random_state=rng), target_false_alarm_rate=alpha, delta=delta
        )
        fails += dist.sf(threshold.value) > threshold.guaranteed_false_alarm_rate
    return fails / trials


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize(("n", "alpha", "delta"), [(10, 0.05, 0.1), (300, 0.02, 0.1)])
def test_the_promise_holds_for_this_model_on_fresh_draws(name, n, alpha, delta):
    trials = 2000
    failed = _coverage(n, alpha, delta, DISTRIBUTIONS[name], trials, seed=n)
    # at most delta, up to three binomial standard errors of the simulation
    assert failed <= delta + 3 * (delta * (1 - delta) / trials) ** 0.5


def test_the_old_average_promise_fails_for_one_model_in_seven():
    """What the issue measured: k / (n + 1) holds on average, but one model's rate is
    above twice that 13-14% of the time with k = 1; the new bound is not."""
    rng = np.random.default_rng(1)
    n, trials = 20, 4000
    rates = np.array([stats.norm.sf(rng.normal(size=n).max()) for _ in range(trials)])
    assert np.mean(rates > 2 / (n + 1)) > 0.1
    assert np.mean(rates > rate_bound(n, 1, 0.1)) <= 0.1 + 3 * (0.09 / trials) ** 0.5


def _records(n: int, prefix: str) -> list[ImageRecord]:
    from pathlib import Path

    return [ImageRecord(Path(f"{prefix}{i}.png"), 0, key=f"good/{prefix}{i}.png") for i in range(n)]


def test_the_promise_holds_after_a_choice_on_the_choice_part():
    """Selection included: five candidate models (level weights, an epoch...) score the
    same normals differently; the candidate with the lowest normal scores on the choice
    part is kept (the choice most likely to make a threshold optimistic). Calibrated on
    the disjoint calibration part, the promise holds; on the choice part itself, it
    fails far more often than delta."""
    rng = np.random.default_rng(3)
    alpha, delta, trials = 0.1, 0.1, 2000
    validation = _records(60, "v")
    choice, calibration = split_roles(validation)
    assert choice and calibration and not set(choice) & set(calibration)
    at = {r: i for i, r in enumerate(validation)}
    pick_choice = [at[r] for r in choice]
    pick_calibration = [at[r] for r in calibration]
    failed_split = failed_same = 0
    for _ in range(trials):
        # each candidate: normal scores N(0, 1) for every image, independent per candidate
        scores = rng.normal(size=(5, len(validation)))
        best = int(np.argmin(scores[:, pick_choice].max(axis=1)))
        split = calibrate_threshold(
            scores[best, pick_calibration], target_false_alarm_rate=alpha, delta=delta
        )
        same = calibrate_threshold(
            scores[best, pick_choice], target_false_alarm_rate=alpha, delta=delta
        )
        failed_split += stats.norm.sf(split.value) > split.guaranteed_false_alarm_rate
        failed_same += stats.norm.sf(same.value) > same.guaranteed_false_alarm_rate
    slack = 3 * (delta * (1 - delta) / trials) ** 0.5
    assert failed_split / trials <= delta + slack
    assert failed_same / trials > 3 * delta  # why the parts are kept apart


def test_too_few_normals_warn_with_what_is_needed(caplog):
    with caplog.at_level(logging.WARNING, logger="fod_core.calibration"):
        threshold = calibrate_threshold(np.arange(16.0), target_false_alarm_rate=0.01)
    assert threshold.value == 15.0 and not threshold.supports_target
    assert threshold.guaranteed_false_alarm_rate == pytest.approx(1 - 0.1 ** (1 / 16))
    assert threshold.guaranteed_false_alarm_rate == pytest.approx(best_supported_rate(16))
    assert "16 calibration normals cannot promise a 0.01" in caplog.text
    assert "230 are needed" in caplog.text
    # (1 - alpha) ** n <= delta: the maximum of n normals keeps alpha
    assert normals_needed(0.01) == 230 and normals_needed(0.05) == 45
    assert rank_for(229, 0.01) is None and rank_for(230, 0.01) == 1
    words = threshold.describe()
    assert "at most 13% false alarms, with 90% confidence, from 16 good parts" in words
    assert "1% was asked: 230 calibration normals are needed" in words


def test_the_promise_in_words_and_in_the_record():
    threshold = calibrate_threshold(np.arange(500.0), target_false_alarm_rate=0.02, delta=0.05)
    record = threshold.to_dict()
    assert record["confidence"] == pytest.approx(0.95) and record["delta"] == 0.05
    assert record["n_normal"] == 500 and record["threshold_rank"] == threshold.rank
    assert record["guaranteed_false_alarm_rate"] <= 0.02
    assert record["promise"].startswith("at most 1.8% false alarms, with 95% confidence, from 500")
    assert type(threshold).from_dict(record) == threshold
    unsafe = calibrate_threshold(np.arange(50.0), held_out=False)
    assert unsafe.describe().startswith("no false-alarm guarantee")


def test_false_alarm_p_value_is_beta_binomial():
    """The count of false alarms among m fresh normals for a model calibrated at rank k of
    n: beta-binomial; P(X >= x) against a simulation of the whole chain."""
    rng = np.random.default_rng(5)
    n, k, m, trials = 20, 1, 200, 20000
    rates = rng.beta(k, n + 1 - k, size=trials)
    counts = rng.binomial(m, rates)
    for x in (5, 15, 30):
        assert false_alarm_p_value(x, m, n, k) == pytest.approx(np.mean(counts >= x), abs=0.01)
    assert false_alarm_p_value(0, m, n, k) == 1.0


def test_an_order_statistic_estimated_from_todays_scores():
    """Today's own order statistic comes back exactly; a larger set's is interpolated
    between today's; above today's largest it is unknown (None), not extrapolated."""
    from fod_core.promise import estimated_order_statistic

    scores = np.arange(1.0, 21.0)  # 1..20: positions i / 21
    assert [estimated_order_statistic(scores, 20, k) for k in (1, 3, 20)] == [20.0, 18.0, 1.0]
    # the 2nd largest of 41: position (41 + 1 - 2) / 42 * 21 = 20.0 -> today's largest
    assert estimated_order_statistic(scores, 41, 2) == 20.0
    # the 3rd largest of 41: position 39 / 42 * 21 = 19.5 -> halfway between 19 and 20
    assert estimated_order_statistic(scores, 41, 3) == pytest.approx(19.5)
    assert estimated_order_statistic(scores, 41, 1) is None  # beyond 20/21


def test_more_normals_estimates_the_larger_sets_threshold():
    """On draws from a known distribution, the forecast's threshold for a larger set lies
    near that set's real order statistic (simulated), and every row keeps its promise."""
    from fod_core.promise import more_normals_forecast

    rng = np.random.default_rng(0)
    today = rng.normal(size=400)
    rows = more_normals_forecast(today, 0.05)
    assert rows[0].n == 400 and rows[0].threshold == pytest.approx(
        np.sort(today)[::-1][rows[0].rank - 1]
    )
    assert [r.n for r in rows] == sorted(r.n for r in rows) and len(rows) >= 3
    step = rows[1]  # the next count that moves the threshold
    assert step.rank == rows[0].rank + 1 and step.rate <= 0.05
    for row in rows[1:]:
        real = np.median([np.sort(rng.normal(size=row.n))[::-1][row.rank - 1] for _ in range(400)])
        assert row.threshold == pytest.approx(real, abs=0.15), row
        assert row.rate <= 0.05 + 1e-12


def test_more_normals_and_the_catch_rate_by_hand():
    """20 calibration normals scored 1..20 cannot promise 5% (45 are needed): the forecast
    says so for 5% and, for today's promise, where the threshold and catch rate go."""
    from fod_core.evaluate import more_normals
    from fod_core.promise import best_supported_rate

    threshold = calibrate_threshold(np.arange(1.0, 21.0), target_false_alarm_rate=0.05)
    calibration = threshold.to_dict() | {"validation_scores": list(np.arange(1.0, 21.0))}
    assert threshold.value == 20.0 and threshold.rank == 1
    defects = np.array([19.75, 19.9, 20.5, 30.0])  # today: 2 of 4 caught
    rows = more_normals(calibration, defects)
    asked = [r for r in rows if r["asked_rate"] == 0.05]
    assert [r["n_normal"] for r in asked][:2] == [20, 45]
    assert asked[0]["catch_rate"] == 0.5 and asked[0]["threshold"] == 20.0
    at_45 = asked[1]  # the maximum of 45: above every score of today's, unknown
    assert at_45["threshold"] is None and at_45["catch_rate_at_most"] == 0.5
    kept = [r for r in rows if r["asked_rate"] == pytest.approx(best_supported_rate(20))]
    moved = next(r for r in kept if r["rank"] == 2)  # the threshold one step down
    # 35 normals keep today's promise at rank 2: position (35 + 1 - 2) / 36 * 21 = 19.83
    assert (moved["n_normal"], moved["more"]) == (35, 15)
    assert moved["threshold"] == pytest.approx(19.0 + 5 / 6)
    assert moved["catch_rate"] == 0.75  # 19.9 is caught now, 19.75 still not
    assert moved["promise"] <= best_supported_rate(20) + 1e-12
    # nothing is forecast where nothing is promised
    assert more_normals(calibration | {"held_out": False}, defects) == []
    assert more_normals(calibration | {"threshold_mode": "f1"}, defects) == []
