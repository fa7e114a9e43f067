"""Retraining when new good samples arrive: ``fod retrain`` (once, or ``--every``).

The data version now in DVC (the ``.dir`` md5 in ``data.dvc``) is compared with the data
versions the registry's models were trained on. Only a category whose current data no
model has been trained on yet is retrained, through the same pipeline: the feature cache
extracts only the new images, the registry's gates decide whether the new model becomes
the champion, and the deploy step serves it. Otherwise nothing runs and the reason is
logged. A lock lets one retrain run at a time; an interrupted one is started again with
the same data version and finishes, reusing the steps that completed (KFP caching).

On a cluster (``kfp_host``) the checking pod keeps no state: a claim in MLflow
(``RetrainClaims``) says which check submitted which data version and its KFP run, so a
second scheduler does not submit it again and a new pod waits for the run of one that died.
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
from components.tracking import registered_name
from pipelines.parameters import run_arguments

log = logging.getLogger(__name__)

STATE_FILE = "retrain.json"
LOCK_FILE = "retrain.lock"
CLAIMS_EXPERIMENT = "fod-retrain-claims"
CLAIM_STALE_SECONDS = 2 * 6 * 3600.0  # twice a KFP run's timeout: its holder is gone


class RetrainBusy(RuntimeError):
    """Another retrain holds the lock."""


@dataclass(frozen=True)
class RetrainDecision:
    category: str
    data_version: str
    retrain: bool
    reason: str
    champion_version: str | None = None


def decide(category: str, data_version: str, *, resume: bool = False) -> RetrainDecision:
    """Retrain only when no registered version was trained on ``data_version`` yet, or
    when the champion trained on it was never deployed (its run failed at the deploy step:
    running the pipeline again takes every completed step from the cache)."""
    from mlflow import MlflowClient

    from components.registry import champion_version

    client = MlflowClient()
    name = registered_name(category)
    champion = champion_version(client, name)
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
        tags = latest.tags or {}
        outcome = (
            "the champion"
            if latest.version == champion
            else f"not promoted: {tags.get('gates', 'gates not recorded')}"
        )
        if "deploy_failed" in tags:  # the alias went back to the served version: a person looks
            outcome = f"its deployment failed ({tags['deploy_failed']}); not retried"
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


@dataclass(frozen=True)
class Claim:
    run_id: str  # the MLflow run that holds it
    data_version: str
    started_ms: int
    holder: str = ""
    kfp_run_id: str = ""


class RetrainClaims:
    """Which check is retraining which data version, kept in MLflow (one RUNNING run per
    claim) so that it outlives the checking pod, whose state is an emptyDir, and is seen
    by every scheduler: the CronJob, a KFP recurring run, a person running `fod retrain`.

    A check submits only with a claim; a check that finds a claim with a KFP run waits for
    that run (a resume after its holder died) instead of submitting it twice."""

    def __init__(self, client=None) -> None:
        from mlflow import MlflowClient

        self.client = client or MlflowClient()
        found = self.client.get_experiment_by_name(CLAIMS_EXPERIMENT)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(CLAIMS_EXPERIMENT)
        )

    def active(self, data_version: str) -> list[Claim]:
        """The live claims on a data version, oldest first; stale ones are closed."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.data_version = '{data_version}'",
        )
        now_ms = time.time() * 1000
        claims = []
        for run in runs:
            if now_ms - run.info.start_time > CLAIM_STALE_SECONDS * 1000:
                log.warning("closing a stale retrain claim %s", run.info.run_id)
                self.client.set_terminated(run.info.run_id, "KILLED")
                continue
            tags = run.data.tags
            claims.append(
                Claim(
                    run.info.run_id,
                    data_version,
                    run.info.start_time,
                    tags.get("holder", ""),
                    tags.get("kfp_run_id", ""),
                )
            )
        return sorted(claims, key=lambda c: (c.started_ms, c.run_id))

    def create(self, data_version: str, categories: list[str], holder: str) -> Claim:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"retrain {data_version[:12]}",
            tags={
                "data_version": data_version,
                "categories": ",".join(categories),
                "holder": holder,
            },
        )
        return Claim(run.info.run_id, data_version, run.info.start_time, holder)

    def acquire(
        self, data_version: str, categories: list[str], holder: str
    ) -> tuple[Claim | None, Claim | None]:
        """``(mine, None)`` when this check may submit, ``(None, theirs)`` when another
        holds the data version. Two checks that claim at the same moment both see both
        claims once written; the older one wins, the other withdraws."""
        existing = self.active(data_version)
        if existing:
            return None, existing[0]
        mine = self.create(data_version, categories, holder)
        first = self.active(data_version)[0]
        if first.run_id != mine.run_id:
            self.release(mine, "KILLED")
            return None, first
        return mine, None

    def record(self, claim: Claim, kfp_run_id: str) -> None:
        self.client.set_tag(claim.run_id, "kfp_run_id", kfp_run_id)

    def release(self, claim: Claim, status: str = "FINISHED") -> None:
        self.client.set_terminated(claim.run_id, status)


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
    verbose: bool = False,
) -> dict:
    """One check: decide per category, run the pipeline for those with new data.

    ``track``: a data folder to ``dvc add`` and push first (new images dropped into it
    become a new data version). ``arguments`` override the pipeline's parameters.
    ``kfp_host``: submit to that Kubeflow Pipelines endpoint and wait, instead of the
    local runner."""
    from mlflow import MlflowClient

    from components.registry import champion_version
    from pipelines.runner import run_local

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
        pipeline_arguments = run_arguments(
            data_version=version.md5,
            categories=todo,
            repo_root=repo_root,
            dvc_remote=remote_url(settings),
            overrides={"deploy_target": "kserve" if kfp_host else "local"} | (arguments or {}),
        )
        started = time.perf_counter()
        if kfp_host:
            run_id = _run_on_kfp(pipeline_arguments, kfp_host, version.md5, todo)
            if run_id is None:
                report["busy"] = "another check is submitting this data version"
                _write_state(home, {"status": "done", "data_version": version.md5})
                return report
            report["kfp_run_id"] = run_id
        else:
            run_local(pipeline_arguments, Path(pipeline_root), verbose=verbose)
        report["pipeline_seconds"] = round(time.perf_counter() - started, 1)
        _write_state(home, {"status": "done", "data_version": version.md5, "categories": todo})
        client = MlflowClient()
        for category in todo:
            name = registered_name(category)
            versions = client.search_model_versions(f"name='{name}'")
            latest = max(versions, key=lambda v: int(v.version))
            champion = champion_version(client, name)
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


def _run_on_kfp(arguments: dict, host: str, data_version: str, categories: list[str]):
    """Submit under a claim and wait; or wait for the run of a claim already held. None
    when another check holds the data version and has not submitted yet."""
    import socket

    from pipelines.runner import submit, wait_for_run

    claims = RetrainClaims()
    mine, theirs = claims.acquire(data_version, categories, holder=socket.gethostname())
    short = data_version.removesuffix(".dir")[:12]
    if theirs is not None:
        if not theirs.kfp_run_id:
            log.info("data %s is claimed by %s, which is submitting: nothing to do", short,
                     theirs.holder or theirs.run_id)  # fmt: skip
            return None
        log.info("data %s is already being trained by KFP run %s (claimed by %s): waiting "
                 "for it instead of submitting again", short, theirs.kfp_run_id,
                 theirs.holder or theirs.run_id)  # fmt: skip
        claim, run_id = theirs, theirs.kfp_run_id
    else:
        claim, run_id = mine, None
    try:
        if run_id is None:
            run_id = submit(arguments, host)
            claims.record(claim, run_id)
        wait_for_run(host, run_id)
    except BaseException:
        claims.release(claim, "FAILED")  # the next check submits again (KFP's cache helps)
        raise
    claims.release(claim)
    return run_id


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")


def retrain_on_drift(
    categories: list[str], check: Callable[[], dict], *, since_seconds: float | None = None
) -> dict:
    """``fod retrain --on-drift``: the retrain check runs only when a category's served
    decisions drifted from its calibration (``fod monitor``)."""
    from components.monitoring import monitor

    reports = [monitor(c, since_seconds=since_seconds) for c in categories]
    drifted = [r["category"] for r in reports if r["drift"]]
    outcome = {"drifted": drifted, "monitor": reports}
    if not drifted:
        log.info("no drift in %s: no retrain check", ", ".join(categories))
        return outcome | {"trained": []}
    return outcome | check()


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
