"""The model server's Prometheus metrics, on the ``/metrics`` the KServe server already serves.

Decisions by outcome, the score distribution, decode errors, latency per model version,
the served version, and what the decision record wrote, dropped, failed to write or shipped.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "fod_decisions",
    "Images scored, by decision (anomalous, normal, or undecided without a threshold)",
    ["model", "version", "outcome"],
)
SCORES = Histogram(
    "fod_score",
    "Image anomaly scores",
    ["model", "version"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf")),
)
DECODE_ERRORS = Counter(
    "fod_decode_errors", "Requests refused because an image could not be decoded", ["model"]
)
LATENCY = Histogram(
    "fod_request_seconds",
    "Time from a predict request's arrival to its answer",
    ["model", "version"],
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, float("inf")),
)
SERVED_VERSION = Gauge(
    "fod_served_version", "The registry version being served (1 for the current one)",
    ["model", "version"],
)  # fmt: skip
RECORDS = Gauge(
    "fod_decision_records",
    "Decisions written to the record, dropped (queue full), failed (store error), shipped "
    "to S3 or failed to ship (retried)",
    ["model", "state"],
)


def observe(model: str, version: str, scores: list[float], decisions: list[bool | None]) -> None:
    for score, decision in zip(scores, decisions, strict=True):
        outcome = "undecided" if decision is None else ("anomalous" if decision else "normal")
        DECISIONS.labels(model, version, outcome).inc()
        SCORES.labels(model, version).observe(score)


def served(model: str, version: str, previous: str | None) -> None:
    if previous is not None and previous != version:
        SERVED_VERSION.labels(model, previous).set(0)
    SERVED_VERSION.labels(model, version).set(1)
