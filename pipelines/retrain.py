"""Retraining when new good samples arrive: ``fod retrain`` (once, or ``--every``).

The data version now in DVC (the ``.dir`` md5 in ``data.dvc``) is compared with the data
versions the registry's models were trained on. Only a category whose current data no
model has been trained on yet is retrained, through the same pipeline: the feature cache
extracts only the new images, the registry's gates decide whether the new model becomes
the champion, and the deploy step serves it. Otherwise nothing runs and the reason is
logged. A lock lets one retrain run at a time; an interrupted one is started again with
the same data version and finishes, reusing the steps that completed (KFP caching).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from components.data_version import DvcRepo, read_data_version, remote_url
from components.settings import fod_home, load_settings
from components.tracking import code_version, registered_name

log = logging.getLogger(__name__)

STATE_FILE = "retrain.json"
LOCK_FILE = "retrain.lock"


class RetrainBusy(RuntimeError):
    """Another retrain holds the lock."""


@dataclass(frozen=True)
class RetrainDecision:
    category: str
    data_version: str
    retrain: bool
    reason: str
    champion_version: str | None = None


def _champion(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, "champion").version
    except MlflowException:
        return None


def decide(category: str, data_version: str, *, resume: bool = False) -> RetrainDecision:
    """Retrain only when no registered version was trained on ``data_version`` yet, or
    when the champion trained on it was never deployed (its run failed at the deploy step:
    running the pipeline again takes every completed step from the cache)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = registered_name(category)
    champion = _champion(client, name)
    short = data_version.removesuffix(".dir")[:12]
    if resume:
        reason = f"an interrupted retrain on data {short} is resumed"
        return RetrainDecision(category, data_version, True, reason, champion)
    trained = [
        v
        for v in client.search_model_versions(f"name='{name}'")
        if (v.tags or {}).get("data_version") == data_version
    ]
    if trained:
        latest = max(trained, key=lambda v: int(v.version))
        if latest.version == champion and "deployed" not in (latest.tags or {}):
            reason = f"champion v{champion} (data {short}) was never deployed: the run is resumed"
            return RetrainDecision(category, data_version, True, reason, champion)
        outcome = (
            "the champion"
            if latest.version == champion
            else f"not promoted: {(latest.tags or {}).get('gates', 'gates not recorded')}"
        )
        reason = f"v{latest.version} was trained on data {short} already ({outcome})"
        return RetrainDecision(category, data_version, False, reason, champion)
    if champion is None:
        reason = f"{name} has no champion: first training, on data {short}"
    else:
        reason = f"new data {short}: no model was trained on it (champion v{champion})"
    return RetrainDecision(category, data_version, True, reason, champion)


class RetrainLock:
    """An exclusive, non-blocking file lock; the holder's pid and start time are in it."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self._handle = None

    def __enter__(self) -> RetrainLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RetrainBusy(
                f"another retrain is running ({holder}); this check does nothing "
                f"(lock: {self.path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.truncate(0)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _read_state(home: Path) -> dict:
    path = home / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(home: Path, state: dict) -> None:
    path = home / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def retrain_once(
    categories: list[str],
    *,
    repo_root: str | Path = ".",
    dvc_file: str | Path = "data.dvc",
    track: str | Path | None = None,
    pipeline_root: str | Path = "runs/pipeline",
    arguments: dict | None = None,
    home: Path | None = None,
    kfp_host: str | None = None,
) -> dict:
    """One check: decide per category, run the pipeline for those with new data.

    ``track``: a data folder to ``dvc add`` and push first (new images dropped into it
    become a new data version). ``arguments`` override the pipeline's parameters.
    ``kfp_host``: submit to that Kubeflow Pipelines endpoint and wait, instead of the
    local runner."""
    from mlflow import MlflowClient

    from pipelines.training import run_local, submit

    home = Path(home or fod_home())
    repo_root = Path(repo_root).resolve()
    settings = load_settings(home)
    settings.export()
    os.environ.setdefault("FOD_HOME", str(home))
    with RetrainLock(home):
        if track is not None:
            repo = DvcRepo(repo_root)
            repo.ensure(settings)
            repo.add_and_push(repo_root / track)
        version = read_data_version(repo_root / dvc_file)
        state = _read_state(home)
        interrupted = state.get("status") == "running" and state.get("data_version") == version.md5
        decisions = [
            decide(c, version.md5, resume=interrupted and c in state.get("categories", []))
            for c in categories
        ]
        for decision in decisions:
            log.info(
                "%s: %s - %s",
                decision.category,
                "retrain" if decision.retrain else "nothing to do",
                decision.reason,
            )
        todo = [d.category for d in decisions if d.retrain]
        report = {
            "data_version": version.md5,
            "decisions": [asdict(d) for d in decisions],
            "trained": todo,
            "results": {},
        }
        if not todo:
            return report
        _write_state(home, {"status": "running", "data_version": version.md5, "categories": todo})
        pipeline_arguments = {
            "dvc_remote": remote_url(settings),
            "data_version": version.md5,
            "categories": todo,
            "code_version": code_version(repo_root),
            "deploy_target": "kserve" if kfp_host else "local",
        } | (arguments or {})
        started = time.perf_counter()
        if kfp_host:
            report["kfp_run_id"] = submit(pipeline_arguments, kfp_host, wait=True)
        else:
            run_local(pipeline_arguments, Path(pipeline_root))
        report["pipeline_seconds"] = round(time.perf_counter() - started, 1)
        _write_state(home, {"status": "done", "data_version": version.md5, "categories": todo})
        client = MlflowClient()
        for category in todo:
            name = registered_name(category)
            versions = client.search_model_versions(f"name='{name}'")
            latest = max(versions, key=lambda v: int(v.version))
            champion = _champion(client, name)
            report["results"][category] = {
                "new_version": latest.version,
                "promoted": champion == latest.version,
                "champion_version": champion,
                "gates": (latest.tags or {}).get("gates"),
                "evidence": (latest.tags or {}).get("evidence"),
                "threshold": (latest.tags or {}).get("threshold"),
            }
            log.info(
                "%s: v%s %s (champion v%s); the decision rests on %s",
                category,
                latest.version,
                "promoted" if champion == latest.version else "not promoted",
                champion,
                (latest.tags or {}).get("evidence", "unrecorded evidence"),
            )
        return report


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '1d' or plain seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 1h or 1d")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def retrain_every(
    interval: float,
    check: Callable[[], dict],
    *,
    max_checks: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[dict]:
    """Run ``check`` every ``interval`` seconds; a failed check is logged, the loop goes on."""
    outcomes = []
    count = 0
    while max_checks is None or count < max_checks:
        count += 1
        started = time.monotonic()
        try:
            outcome = check()
        except RetrainBusy as busy:
            outcome = {"error": str(busy)}
            log.warning("check %d skipped: %s", count, busy)
        except Exception as error:  # a down registry, a failed run: the schedule goes on
            outcome = {"error": f"{type(error).__name__}: {error}"}
            log.error("check %d failed, the schedule goes on: %s", count, outcome["error"])
        outcomes.append(outcome)
        if max_checks is not None and count >= max_checks:
            break
        sleep(max(0.0, interval - (time.monotonic() - started)))
    return outcomes
