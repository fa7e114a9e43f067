"""Has the served model drifted from its calibration? The alarm rate against the rate the
threshold promised, and the served scores against the validation normals.

The alarm test is binomial, so that 3 alarms in 100 parts is not called drift at a 1%
promise when it is chance; more alarms than the promise allows mean the line makes more
defects or the model no longer fits it (the review page tells which). The score test
compares distributions: the Kolmogorov-Smirnov statistic and the population stability
index (PSI) over the validation scores' deciles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

ALPHA = 0.01  # a drift verdict needs p below this
PSI_MAJOR = 0.25  # the usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a major shift
MIN_DECISIONS = 20


@dataclass(frozen=True)
class DriftCheck:
    n_decisions: int
    alarms: int
    alarm_rate: float | None
    promised_rate: float | None
    alarm_p_value: float | None
    ks_statistic: float | None
    ks_p_value: float | None
    psi: float | None
    drift: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def verdict(self) -> str:
        if self.n_decisions < MIN_DECISIONS:
            return f"no verdict: {self.n_decisions} decisions, at least {MIN_DECISIONS} needed"
        if self.drift:
            return "DRIFT: " + "; ".join(self.reasons)
        rate = "" if self.alarm_rate is None else f", alarm rate {self.alarm_rate:.3g}"
        psi = "" if self.psi is None else f", PSI {self.psi:.3g}"
        return f"no drift ({self.n_decisions} decisions{rate}{psi})"


def population_stability_index(
    expected: Sequence[float], actual: Sequence[float], bins: int = 10
) -> float:
    """PSI of ``actual`` against ``expected`` over the expected scores' quantile bins."""
    expected, actual = np.asarray(expected, float), np.asarray(actual, float)
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    share_expected = np.bincount(np.searchsorted(edges, expected), minlength=edges.size + 1)
    share_actual = np.bincount(np.searchsorted(edges, actual), minlength=edges.size + 1)
    e = np.clip(share_expected / expected.size, 1e-4, None)
    a = np.clip(share_actual / actual.size, 1e-4, None)
    return float(np.sum((a - e) * np.log(a / e)))


def check_drift(
    served_scores: Sequence[float],
    served_alarms: Sequence[bool | None],
    calibration_scores: Sequence[float],
    promised_rate: float | None,
    *,
    alpha: float = ALPHA,
    psi_limit: float = PSI_MAJOR,
) -> DriftCheck:
    """The served decisions against the model's calibration (its validation normals'
    scores and the false-alarm rate its threshold promised)."""
    from scipy.stats import binom, ks_2samp

    scores = np.asarray(served_scores, float)
    decided = [a for a in served_alarms if a is not None]  # no threshold: no decision
    n, alarms = int(scores.size), int(sum(bool(a) for a in decided))
    if n < MIN_DECISIONS or len(calibration_scores) == 0:
        rate = alarms / len(decided) if decided else None
        return DriftCheck(n, alarms, rate, promised_rate, None, None, None, None, False)
    reasons = []
    alarm_p = None
    if promised_rate is not None and decided:
        alarm_p = float(binom.sf(alarms - 1, len(decided), promised_rate))
        if alarm_p < alpha:
            reasons.append(
                f"{alarms} alarms in {len(decided)} parts ({alarms / len(decided):.3g}) where "
                f"the threshold promised at most {promised_rate:.3g} (binomial p {alarm_p:.2g})"
            )
    ks = ks_2samp(scores, np.asarray(calibration_scores, float))
    psi = population_stability_index(calibration_scores, scores)
    if ks.pvalue < alpha and psi > psi_limit:
        reasons.append(
            f"scores shifted from the validation normals (KS {ks.statistic:.3g}, "
            f"p {ks.pvalue:.2g}; PSI {psi:.3g} > {psi_limit})"
        )
    rate = alarms / len(decided) if decided else None
    return DriftCheck(
        n, alarms, rate, promised_rate, alarm_p, float(ks.statistic), float(ks.pvalue), psi,
        bool(reasons), reasons,
    )  # fmt: skip
