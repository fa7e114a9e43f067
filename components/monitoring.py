"""``fod monitor``: a category's served decisions against its model's calibration, as a
verdict with its numbers, a run in MLflow and, on request, a picture."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from components.serving.records import read_decisions
from components.serving.shipping import ShippingError, is_s3, read_shipped
from fod_core.artifact import read_manifest
from fod_core.drift import DriftCheck, check_drift

log = logging.getLogger(__name__)


class MonitorError(RuntimeError):
    """No decision record, or no calibration to compare it with."""


def calibration_of(
    model_dir: str | Path,
) -> tuple[list[float], float | None, float | None, int | None]:
    """(calibration normals' scores, promised false-alarm rate, threshold, its rank among
    those scores) of an artefact. The rank is None for F1 thresholds, which promise no
    false-alarm rate."""
    calibration = read_manifest(model_dir).get("calibration") or {}
    scores = calibration.get("validation_scores")
    if not scores:
        raise MonitorError(f"{model_dir} has no calibration scores to compare with")
    promised = calibration.get("guaranteed_false_alarm_rate")
    if promised is None:
        promised = calibration.get("target_false_alarm_rate")
    rank = calibration.get("threshold_rank")
    return list(scores), promised, calibration.get("threshold"), rank


def review_verdicts(record: str | Path) -> dict[int, str]:
    """decision id -> the reviewer's verdict ('good' or 'defective'), from a local record
    that the review page writes to; a shipped record carries none."""
    import sqlite3

    if not Path(record).is_file():
        return {}
    connection = sqlite3.connect(f"file:{Path(record)}?mode=ro", uri=True, timeout=5)
    try:
        rows = connection.execute("SELECT decision_id, verdict FROM verdicts").fetchall()
    except sqlite3.OperationalError:  # a record from before reviews
        rows = []
    finally:
        connection.close()
    return dict(rows)


def _registry_calibration(name: str, version: str):
    from components.tracking import download_fod_model

    with tempfile.TemporaryDirectory(prefix="fod-monitor-") as tmp:
        return calibration_of(download_fod_model(f"models:/{name}/{version}", tmp))


def monitor(
    category: str,
    *,
    since_seconds: float | None = None,
    record: str | Path | None = None,
    model_dir: str | Path | None = None,
    plot: str | Path | None = None,
    track: bool = True,
    home: str | Path | None = None,
) -> dict:
    """One verdict per served model version in the record (the newest version first).

    The calibration comes from ``model_dir`` when given, else from each version in the
    registry. ``track``: log the numbers to the category's MLflow experiment."""
    from components.tracking import registered_name

    name = registered_name(category)
    since = time.time() - since_seconds if since_seconds else None
    record, rows = served_decisions(name, record, since=since, home=home)
    verdicts = {} if is_s3(record) else review_verdicts(record)
    by_version: dict[str, list[dict]] = {}
    for row in rows:
        by_version.setdefault(row["model_version"], []).append(row)
    report = {"category": category, "record": record, "decisions": len(rows), "versions": []}
    for version in sorted(by_version, key=_version_order, reverse=True):
        decisions = by_version[version]
        if model_dir is None and not version.isdigit():
            raise MonitorError(
                f"{name} version {version!r} is not a registry version (a model served from "
                "a folder): pass --model FOLDER for its calibration"
            )
        calibration, promised, threshold, rank = (
            calibration_of(model_dir) if model_dir else _registry_calibration(name, version)
        )
        check = check_drift(
            [r["score"] for r in decisions],
            [None if r["is_anomalous"] is None else bool(r["is_anomalous"]) for r in decisions],
            calibration,
            promised,
            rank=rank,
            verdicts=[verdicts.get(r["id"]) for r in decisions],
        )
        entry = {"model_version": version, "verdict": check.verdict(), **check.to_dict()}
        report["versions"].append(entry)
        log.info("%s v%s: %s", name, version, check.verdict())
        if plot:
            from fod_core.visualize import plot_drift

            path = Path(plot)
            if len(by_version) > 1:
                path = path.with_name(f"{path.stem}-v{version}{path.suffix}")
            plot_drift(
                calibration,
                [r["score"] for r in decisions],
                [r["time"] for r in decisions],
                [bool(r["is_anomalous"]) for r in decisions],
                threshold,
                promised,
                path,
                f"{name} v{version}",
            )
            entry["plot"] = str(path)
        if track:
            _log_to_mlflow(category, name, version, check, since_seconds)
    report["drift"] = any(v["drift"] for v in report["versions"])
    return report


def served_decisions(
    name: str,
    record: str | Path | None = None,
    *,
    since: float | None = None,
    home: str | Path | None = None,
) -> tuple[str, list[dict]]:
    """(where, the model's decisions oldest first) from ``record``: an SQLite file or the
    S3 location servers ship to. Unset: FOD_DECISION_RECORD (a cluster), else the local
    server's file."""
    from components.local.servers import LocalServing
    from components.settings import shipped_record

    location = str(record) if record else shipped_record()
    if location and is_s3(location):
        try:
            return location, read_shipped(location, name, since=since)
        except ShippingError:
            raise
        except Exception as error:  # S3 down, no such bucket, no credentials
            raise MonitorError(
                f"cannot read the shipped decision record at {location} "
                f"({type(error).__name__}: {error})"
            ) from error
    path = Path(record) if record else LocalServing(home).records_file(name)
    if not path.is_file():
        raise MonitorError(
            f"no decision record at {path}: serve the model with --record (local servers "
            "record by default) or pass --record PATH or s3://bucket/prefix"
        )
    return str(path), [r for r in read_decisions(path, since=since) if r["model_name"] == name]


def _version_order(version: str):
    return (0, int(version)) if version.isdigit() else (-1, version)


def _log_to_mlflow(category: str, name: str, version: str, check: DriftCheck, since) -> None:
    import mlflow

    from components.settings import load_settings
    from components.tracking import connect

    connect(load_settings().mlflow_uri, category)
    with mlflow.start_run(run_name=f"monitor-{name}-v{version}"):
        mlflow.set_tags(
            {
                "stage": "monitoring",
                "category": category,
                "model_version": version,
                "verdict": check.verdict()[:5000],
                "drift": str(check.drift).lower(),
            }
        )
        values = {
            k: v
            for k, v in check.to_dict().items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v is not None
        }
        mlflow.log_metrics({k: float(v) for k, v in values.items()})
        mlflow.log_dict({"check": check.to_dict(), "since_seconds": since}, "monitor/check.json")


def print_report(report: dict) -> None:
    print(f"{report['category']}: {report['decisions']} decisions in {report['record']}")
    for entry in report["versions"]:
        print(f"  v{entry['model_version']}: {entry['verdict']}")
        if entry.get("plot"):
            print(f"    plot: {entry['plot']}")
    print(json.dumps({"drift": report["drift"]}))
