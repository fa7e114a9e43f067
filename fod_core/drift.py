"""Has the served model drifted from its calibration? Two tests, each on the evidence
that can carry it, together at the stated level ``alpha`` (each at alpha / 2 when both
run, so a healthy model is reported in drift at most ``alpha`` of the time):

- **False alarms against the promise**, only where the alarms' truth is known: alarms
  that a reviewer confirmed good are false alarms (at least that many), among at most the
  decisions not confirmed defective. Given the threshold's calibration (the rank k of
  n normals) a healthy model's false-alarm count is beta-binomial, not binomial: the
  model's own rate varies with its calibration set (`fod_core.promise`). Unreviewed
  alarms may be real defects: they are reported, never called a broken promise, so a line
  that makes more defects than the promised false-alarm rate is not in drift for that.
- **The score distribution** of the parts (those confirmed defective left out) against
  the calibration normals': the Kolmogorov-Smirnov test, with the population stability
  index (PSI) over the calibration scores' deciles as the size of the shift that counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

ALPHA = 0.01  # a healthy model is reported in drift at most this often
PSI_MAJOR = 0.25  # the usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a major shift
MIN_DECISIONS = 20
GOOD, DEFECTIVE = "good", "defective"  # review verdicts (`components.review.Verdict`)


@dataclass(frozen=True)
class DriftCheck:
    n_decisions: int
    alarms: int
    alarm_rate: float | None
    promised_rate: float | None
    reviewed: int  # decisions with a verdict
    false_alarms: int  # alarms reviewed as good
    false_alarm_p_value: float | None  # None: no verdict, the alarms' truth is unknown
    ks_statistic: float | None
    ks_p_value: float | None
    psi: float | None
    drift: bool
    reasons: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)  # what each test rested on

    def to_dict(self) -> dict:
        return asdict(self)

    def verdict(self) -> str:
        if self.n_decisions < MIN_DECISIONS:
            return f"no verdict: {self.n_decisions} decisions, at least {MIN_DECISIONS} needed"
        if self.drift:
            return "DRIFT: " + "; ".join(self.reasons)
        rate = "" if self.alarm_rate is None else f", alarm rate {self.alarm_rate:.3g}"
        psi = "" if self.psi is None else f", PSI {self.psi:.3g}"
        return f"no drift ({self.n_decisions} decisions{rate}{psi}): " + "; ".join(self.evidence)


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
    rank: int | None = None,
    verdicts: Sequence[str | None] | None = None,
    alpha: float = ALPHA,
    psi_limit: float = PSI_MAJOR,
) -> DriftCheck:
    """The served decisions against the model's calibration: its calibration normals'
    scores, the threshold's ``rank`` among them and the rate it promised. ``verdicts``:
    per decision, a reviewer's 'good' / 'defective' or None (not reviewed)."""
    from scipy.stats import ks_2samp

    from fod_core.promise import false_alarm_p_value

    scores = np.asarray(served_scores, float)
    alarmed = [None if a is None else bool(a) for a in served_alarms]
    verdicts = list(verdicts) if verdicts is not None else [None] * len(alarmed)
    n, alarms = int(scores.size), sum(a is True for a in alarmed)
    decided = sum(a is not None for a in alarmed)  # no threshold: no decision
    rate = alarms / decided if decided else None
    reviewed = sum(v is not None for v in verdicts)
    false_alarms = sum(a is True and v == GOOD for a, v in zip(alarmed, verdicts, strict=True))
    defective = [v == DEFECTIVE for v in verdicts]
    base = dict(
        n_decisions=n, alarms=alarms, alarm_rate=rate, promised_rate=promised_rate,
        reviewed=reviewed, false_alarms=false_alarms,
    )  # fmt: skip
    if n < MIN_DECISIONS or len(calibration_scores) == 0:
        return DriftCheck(**base, false_alarm_p_value=None, ks_statistic=None, ks_p_value=None,
                          psi=None, drift=False)  # fmt: skip
    n_cal = len(calibration_scores)
    promise_testable = rank is not None and reviewed > 0 and decided > 0
    level = alpha / 2 if promise_testable else alpha
    reasons, evidence = [], []
    p_false = None
    if promise_testable:
        # at least `false_alarms` false alarms among at most this many good parts: both
        # bounds make the p-value larger than the true one (a conservative test)
        good_at_most = sum(a is not None and not d for a, d in zip(alarmed, defective, strict=True))
        p_false = false_alarm_p_value(false_alarms, good_at_most, n_cal, rank)
        evidence.append(
            f"false alarms: {false_alarms} alarms reviewed as good among at most "
            f"{good_at_most} good parts ({reviewed} reviewed), beta-binomial against the "
            f"threshold's rank {rank} of {n_cal} calibration normals, p {p_false:.2g}"
        )
        if p_false < level:
            reasons.append(
                f"{false_alarms} confirmed false alarms in at most {good_at_most} good parts "
                f"where the threshold promised at most {promised_rate:.3g} (p {p_false:.2g})"
            )
    else:
        why = "no reviewed verdict" if reviewed == 0 else "no calibration rank"
        evidence.append(
            f"alarm rate {rate if rate is None else round(rate, 4)} reported, not tested "
            f"against the false-alarm promise ({why}: unreviewed alarms may be real defects)"
        )
    kept = scores[~np.asarray(defective, bool)] if any(defective) else scores
    # exact p-values: the asymptotic ones run a little over the level for small n
    ks = ks_2samp(kept, np.asarray(calibration_scores, float), method="exact")
    psi = population_stability_index(calibration_scores, kept)
    evidence.append(
        f"scores: {kept.size} parts (confirmed defects left out) against {n_cal} "
        f"calibration normals, KS p {ks.pvalue:.2g}, PSI {psi:.3g}"
    )
    if ks.pvalue < level and psi > psi_limit:
        reasons.append(
            f"scores shifted from the calibration normals (KS {ks.statistic:.3g}, "
            f"p {ks.pvalue:.2g}; PSI {psi:.3g} > {psi_limit})"
        )
    return DriftCheck(
        **base, false_alarm_p_value=p_false, ks_statistic=float(ks.statistic),
        ks_p_value=float(ks.pvalue), psi=psi, drift=bool(reasons), reasons=reasons,
        evidence=evidence,
    )  # fmt: skip
