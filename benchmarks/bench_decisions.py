"""The "Decisions" table of BENCHMARKS.md: what the product's thresholds, gate and drift
check promise, and how often each holds, by simulation with the product's own functions.

For n calibration normals and a target false-alarm rate alpha at confidence 1 - delta:
the threshold's rank, the rate it promises, the measured coverage (share of calibration
sets whose model keeps the promise, true rate read from the score distribution), the
promotion gate's false refusals of a perfectly calibrated model (20 held-out normals),
the drift check's false drift (2,000 healthy parts) and its power against a stated shift
(normal parts scoring one standard deviation higher).

    python benchmarks/bench_decisions.py [--trials 5000] [--out benchmarks/results/decisions.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from scipy import stats

from components.registry import PromotionGates, check_gates
from fod_core.calibration import calibrate_threshold
from fod_core.drift import check_drift
from fod_core.evaluate import false_alarms

SHIFT = 1.0  # standard deviations
SERVED = 2000
TEST_NORMALS = 20


def row(n: int, alpha: float, delta: float, trials: int, rng) -> dict:
    covered = refused = drifted = caught = 0
    gates = PromotionGates()
    power_trials = max(trials // 4, 100)
    for t in range(trials):
        calibration = rng.normal(size=n)
        threshold = calibrate_threshold(calibration, target_false_alarm_rate=alpha, delta=delta)
        covered += stats.norm.sf(threshold.value) <= threshold.guaranteed_false_alarm_rate
        decisions = rng.normal(size=TEST_NORMALS) >= threshold.value
        # a model whose planted metrics pass: only the false-alarm gate can refuse it
        planted = {"evidence": "planted", "planted_image_auroc": 1.0, "planted_aupro": 1.0}
        metrics = planted | false_alarms(
            decisions, threshold.guaranteed_false_alarm_rate, threshold.to_dict()
        )
        refused += not check_gates(metrics, gates, None)[0]
        served = rng.normal(size=SERVED)
        args = (calibration, threshold.guaranteed_false_alarm_rate)
        drifted += check_drift(served, served >= threshold.value, *args, rank=threshold.rank).drift
        if t < power_trials:
            shifted = rng.normal(SHIFT, 1, size=SERVED)
            caught += check_drift(
                shifted, shifted >= threshold.value, *args, rank=threshold.rank
            ).drift
    return {
        "n": n,
        "alpha": alpha,
        "confidence": 1 - delta,
        "rank": threshold.rank,
        "promised_rate": round(threshold.guaranteed_false_alarm_rate, 4),
        "supports_target": threshold.supports_target,
        "coverage": covered / trials,
        "gate_false_refusal": refused / trials,
        "false_drift": drifted / trials,
        "drift_power_shift_1sd": caught / power_trials,
        "trials": trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decisions.json"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # calibrate_threshold warns on every small n
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    rows = [
        row(n, alpha, 0.1, args.trials, rng)
        for n in (10, 20, 50, 100, 300)
        for alpha in (0.01, 0.05)
    ]
    print(
        "| n | alpha | confidence | rank | promised rate | coverage | gate false refusal "
        "| false drift | drift power (+1 sd) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        promised = f"{r['promised_rate']:.4f}" + ("" if r["supports_target"] else " (max)")
        print(
            f"| {r['n']} | {r['alpha']} | {r['confidence']:.2f} | {r['rank']} | {promised} "
            f"| {r['coverage']:.3f} | {r['gate_false_refusal']:.3f} | {r['false_drift']:.4f} "
            f"| {r['drift_power_shift_1sd']:.2f} |"
        )
    print(f"{time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
