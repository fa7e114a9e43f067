"""Holds the served model and reloads it in the background when its alias moves."""

from __future__ import annotations

import logging
import threading
import time

from components.serving.source import LoadedModel, ModelSource, TorchRunner, run_here

log = logging.getLogger(__name__)


class FODPredictor:
    """Holds the served model and keeps it on the version its source points at."""

    def __init__(
        self,
        source: ModelSource,
        *,
        poll_interval: float = 10.0,
        retry_failed_after: float = 300.0,
    ) -> None:
        self.source = source
        self.poll_interval = poll_interval
        self.retry_failed_after = retry_failed_after
        self._active: LoadedModel | None = None
        self._loading: str | None = None
        # version -> (error, when): a version that failed to load is tried again only after
        # retry_failed_after seconds (a broken artefact stays broken; an S3 outage passes).
        self._failed: dict[str, tuple[str, float]] = {}
        self.scoring_stats: dict[str, int] = {}  # batches, requests, images scored
        # the last alias check: ok, when, and since when it fails (the registry is down)
        self.last_check: dict = {"ok": None, "at": None, "error": None, "failing_since": None}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Where PyTorch work runs: here by default; the server's BatchScorer.call, so that
        # loading and scoring share one thread.
        self.run_torch: TorchRunner = run_here

    @property
    def active(self) -> LoadedModel | None:
        return self._active

    def load_current(self) -> LoadedModel:
        version = self.source.current_version()
        return self._load(version)

    def _load(self, version: str) -> LoadedModel:
        self._loading = version
        started = time.perf_counter()
        try:
            loaded = self.source.load(version, run_torch=self.run_torch)
        except Exception as error:
            self._failed[version] = (f"{type(error).__name__}: {error}", time.monotonic())
            raise
        finally:
            self._loading = None
        self._active = loaded  # one reference swap: in-flight requests keep the old model
        self._failed.pop(version, None)
        log.info(
            "serving %s version %s (loaded in %.1fs)",
            self.source.uri,
            version,
            time.perf_counter() - started,
        )
        return loaded

    def check_for_update(self) -> bool:
        """Load the source's current version if it differs from the served one."""
        version = self.source.current_version()
        active = self._active
        if active and active.version == version:
            return False
        failed = self._failed.get(version)
        if failed and time.monotonic() - failed[1] < self.retry_failed_after:
            return False
        log.info("%s moved to version %s; loading it in the background", self.source.uri, version)
        self._load(version)
        return True

    def poll_once(self) -> None:
        """One alias check; a failure (the registry down, a load failing) keeps the served
        model, is logged once when it starts and when it ends, and shows in ``status``."""
        now = time.time()
        try:
            self.check_for_update()
        except Exception as error:
            first = self.last_check["failing_since"] is None
            active = self._active
            self.last_check = {
                "ok": False,
                "at": now,
                "error": f"{type(error).__name__}: {error}"[:500],
                "failing_since": self.last_check["failing_since"] or now,
            }
            if first:
                log.warning(
                    "cannot check %s for a new version (%s); still serving version %s, "
                    "checking every %.0fs",
                    self.source.uri,
                    self.last_check["error"],
                    active.version if active else None,
                    self.poll_interval,
                )
            return
        if self.last_check["failing_since"] is not None:
            log.info(
                "%s answers again after %.0fs",
                self.source.uri,
                now - self.last_check["failing_since"],
            )
        self.last_check = {"ok": True, "at": now, "error": None, "failing_since": None}

    def start_watching(self) -> None:
        if not self.source.follows_alias or self.poll_interval <= 0 or self._watcher:
            return

        def loop() -> None:
            while not self._stop.wait(self.poll_interval):
                self.poll_once()

        self._watcher = threading.Thread(target=loop, name="fod-model-watch", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()

    def status(self) -> dict:
        active = self._active
        return {
            "source": self.source.uri,
            "ready": active is not None,
            "version": active.version if active else None,
            "runtime": self.source.runtime,
            "precision": active.detector.precision.value if active else None,  # auto resolved
            "loaded_at": active.loaded_at if active else None,
            "loading": self._loading,
            "failed_versions": {v: error for v, (error, _) in dict(self._failed).items()},
            "threshold": active.detector.post.threshold if active else None,
            "promise": active.promise if active else None,
            "scored": dict(self.scoring_stats),
            "last_check": dict(self.last_check),
        }
