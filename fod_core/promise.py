"""What a threshold set on n normal scores promises about *this* model's false alarms.

With the threshold at the k-th largest of n normal calibration scores (continuous,
exchangeable with the normals to come), the deployed model's false-alarm rate F is
random over calibration sets: F ~ Beta(k, n + 1 - k). Its mean k / (n + 1) is the usual
conformal promise, but it holds only on average over calibration sets; a factory runs
one model, so the product promises a *training-conditional* bound instead:

    P(F > alpha) <= delta   (alpha the rate, 1 - delta the confidence)

and every later test of the model's false alarms (the promotion gate, drift) compares
counts with the distribution they really have given (n, k): beta-binomial, not binomial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_DELTA = 0.1  # 90% confidence


def rank_for(n: int, alpha: float, delta: float = DEFAULT_DELTA) -> int | None:
    """The largest k such that the k-th largest of ``n`` normal scores keeps
    P(false-alarm rate > ``alpha``) <= ``delta``; None when even the maximum cannot."""
    from scipy.stats import beta

    if n < 1:
        return None
    ks = list(range(1, n + 1))
    tails = beta.sf(alpha, ks, [n + 1 - k for k in ks])
    good = [k for k, tail in zip(ks, tails, strict=True) if tail <= delta + 1e-12]
    return max(good) if good else None


def rate_bound(n: int, rank: int, delta: float = DEFAULT_DELTA) -> float:
    """The rate that the ``rank``-th largest of ``n`` scores keeps with confidence
    1 - ``delta``: the (1 - delta) quantile of Beta(rank, n + 1 - rank)."""
    from scipy.stats import beta

    return float(beta.isf(delta, rank, n + 1 - rank))


def best_supported_rate(n: int, delta: float = DEFAULT_DELTA) -> float:
    """The lowest rate ``n`` normals can promise at confidence 1 - ``delta`` (threshold at
    their maximum): 1 - delta ** (1 / n)."""
    return 1.0 - delta ** (1.0 / n) if n else 1.0


def normals_needed(alpha: float, delta: float = DEFAULT_DELTA) -> int:
    """How many calibration normals promise ``alpha`` at confidence 1 - ``delta``."""
    return max(1, math.ceil(math.log(delta) / math.log1p(-alpha) - 1e-9))


def false_alarm_p_value(false_alarms: int, n_new: int, n_calibration: int, rank: int) -> float:
    """P(at least ``false_alarms`` of ``n_new`` fresh normals score at or above the
    threshold) for a model calibrated exactly as promised: beta-binomial(n_new, rank,
    n_calibration + 1 - rank). A small value means the model breaks its calibration."""
    from scipy.stats import betabinom

    if false_alarms <= 0:
        return 1.0
    return float(betabinom.sf(false_alarms - 1, n_new, rank, n_calibration + 1 - rank))


def percent(rate: float) -> str:
    """0.0213 -> '2.1%', 0.1 -> '10%': what a quality engineer reads."""
    value = rate * 100
    return f"{value:.2g}%" if value < 10 else f"{value:.0f}%"


def ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


@dataclass(frozen=True)
class Promise:
    """The false-alarm promise of a threshold calibrated on ``n`` normals at ``rank``."""

    n: int
    rank: int
    delta: float
    target: float
    held_out: bool = True  # the normals were neither trained nor chosen on

    @property
    def rate(self) -> float:
        return rate_bound(self.n, self.rank, self.delta)

    @property
    def expected_rate(self) -> float:
        return self.rank / (self.n + 1)

    @property
    def supports_target(self) -> bool:
        return self.rate <= self.target + 1e-12

    def in_words(self) -> str:
        """e.g. 'at most 2.1% false alarms, with 90% confidence, from 140 good parts'."""
        if not self.held_out:
            return (
                f"no false-alarm guarantee: the threshold comes from {self.n} images the "
                "model trained or chose on (use a validation fraction above 0)"
            )
        words = (
            f"at most {percent(self.rate)} false alarms, with {percent(1 - self.delta)} "
            f"confidence, from {self.n} good parts (threshold at the {ordinal(self.rank)} "
            "highest of their scores)"
        )
        if not self.supports_target:
            words += (
                f"; {percent(self.target)} was asked: {normals_needed(self.target, self.delta)}"
                " calibration normals are needed for it"
            )
        return words


@dataclass(frozen=True)
class MoreNormals:
    """The threshold a larger calibration set would give for the same asked rate."""

    n: int  # calibration normals
    rank: int  # the threshold's rank among them (1: the highest)
    rate: float  # what it promises, at the same confidence
    threshold: float | None  # estimated from today's normals; None: above all of them


def estimated_order_statistic(scores, n_new: int, rank: int) -> float | None:
    """The ``rank``-th largest of ``n_new`` normal scores, estimated from ``scores``: their
    empirical quantile at the order statistic's plotting position (n_new + 1 - rank) /
    (n_new + 1), interpolated between today's order statistics (positions i / (n + 1)).
    None when that position lies above today's largest score: more normals are needed
    than these scores can speak for, and the threshold would be at least their maximum."""
    import numpy as np

    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(ordered)
    position = (n_new + 1 - rank) / (n_new + 1) * (n + 1)  # in units of today's ranks
    if position > n + 1e-9:
        return None
    if position <= 1:
        return float(ordered[0])
    below = int(position)
    if below >= n:
        return float(ordered[-1])
    fraction = position - below
    return float(ordered[below - 1] + fraction * (ordered[below] - ordered[below - 1]))


def _next_rank_step(n: int, alpha: float, delta: float) -> int:
    """The smallest count above ``n`` whose rank for ``alpha`` is higher than ``n``'s: how
    many normals move the threshold one order statistic down."""
    current = rank_for(n, alpha, delta) or 0
    low, high = n, max(2 * n, n + 8)
    while (rank_for(high, alpha, delta) or 0) <= current:
        low, high = high, 2 * high
    while high - low > 1:  # rank_for grows with the count
        middle = (low + high) // 2
        if (rank_for(middle, alpha, delta) or 0) > current:
            high = middle
        else:
            low = middle
    return high


def more_normals_forecast(scores, alpha: float, delta: float = DEFAULT_DELTA) -> list[MoreNormals]:
    """What more good parts behind the threshold would give, for the asked rate ``alpha``:
    today's calibration, the count that promises ``alpha`` (when today's cannot), the next
    count that moves the threshold down one order statistic, and twice and four times the
    larger of those. Thresholds are estimated from today's scores
    (``estimated_order_statistic``)."""
    n = len(scores)
    needed = normals_needed(alpha, delta)
    base = max(n, needed)
    counts = sorted({n, needed, _next_rank_step(base, alpha, delta), 2 * base, 4 * base})
    rows = []
    for count in (c for c in counts if c >= n):
        rank = rank_for(count, alpha, delta) or 1  # none promises alpha: the maximum
        threshold = estimated_order_statistic(scores, count, rank)  # today's: exact
        rows.append(MoreNormals(count, rank, rate_bound(count, rank, delta), threshold))
    return rows
