"""Small helpers for KFP artifacts shared by the components."""

from __future__ import annotations

import json
from pathlib import Path


def write_metrics_file(metrics) -> None:
    """Also write a Metrics artifact's values to its file.

    KFP keeps ``log_metric`` values in metadata only; a Metrics output with no file makes
    the KFP local runner treat the task's cache entry as stale (it checks that every
    output artifact exists), so the step would rerun on every pipeline run.
    """
    path = Path(metrics.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics.metadata), indent=2, sort_keys=True))


# A step's one-line result for the person running the pipeline: the local run's progress
# report (pipelines.progress) shows these lines under the step; the rest goes to the log.
SUMMARY_MARKER = "fod-summary: "


def print_summary(result: dict) -> None:
    print(SUMMARY_MARKER + json.dumps(result), flush=True)
