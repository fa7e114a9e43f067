"""The one PyTorch thread: decodes and scores the images of concurrent requests in batches."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from components.serving.protocol import (
    InvalidRequest,
    RequestOptions,
    decode_images,
    image_results,
)
from components.serving.source import LoadedModel, T

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    model: LoadedModel
    images: list[bytes]
    options: RequestOptions
    future: Future
    max_pixels: int
    decoded: list = field(default_factory=list)


class BatchScorer:
    """One scoring thread that puts the images of requests waiting at the same time into
    one forward pass (up to ``max_batch`` images): under concurrent load the model runs at
    its larger-batch cost per image, and a lone request is scored at once, never delayed.
    Requests for different model versions (during a reload) are never mixed.

    It is the process's only PyTorch thread: model loading runs here too (``call``).
    A second thread running PyTorch ops gets OpenMP workers of its own, and with more of
    them than cores every op gets slower (``fod_core.runtime``; 20-30% here)."""

    def __init__(self, max_batch: int = 1, stats: dict | None = None) -> None:
        self.max_batch = max_batch
        self.stats = stats if stats is not None else {}
        self._pending: deque[_Pending] = deque()
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fod-score", daemon=True)
        self._thread.start()

    def submit(
        self, model: LoadedModel, images: list[bytes], options: RequestOptions, max_pixels: int
    ) -> Future:
        """Encoded images; decoding happens on the scoring thread too (PyTorch already uses
        every core: more threads would only oversubscribe them)."""
        future: Future = Future()
        with self._ready:
            self._pending.append(_Pending(model, images, options, future, max_pixels))
            self._ready.notify()
        return future

    def call(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the scoring thread, before the next batch, and return its
        result (or raise its error). Scoring waits meanwhile."""
        if threading.current_thread() is self._thread:
            return work()
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the model server is shutting down")
            self._jobs.append((work, future))
            self._ready.notify()
        return future.result()

    def close(self) -> None:
        """Stop the thread; requests still queued fail instead of waiting forever."""
        with self._ready:
            self._closed = True
            pending, self._pending = list(self._pending), deque()
            jobs, self._jobs = list(self._jobs), deque()
            self._ready.notify()
        futures = [item.future for item in pending] + [future for _, future in jobs]
        for future in futures:
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the model server is shutting down"))

    def _run_jobs(self) -> None:
        while True:
            with self._ready:
                if not self._jobs:
                    return
                work, future = self._jobs.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except BaseException as error:  # the caller gets it; this thread goes on
                    future.set_exception(error)

    def _next_batch(self) -> list[_Pending] | None:
        self._run_jobs()
        with self._ready:
            while not self._pending and not self._closed:
                if self._jobs:
                    break
                self._ready.wait()
            if self._closed:
                return None
            if not self._pending:
                return []
            batch = [self._pending.popleft()]
            size = len(batch[0].images)
            for item in list(self._pending):
                if item.model is batch[0].model and size + len(item.images) <= self.max_batch:
                    self._pending.remove(item)
                    batch.append(item)
                    size += len(item.images)
        # A request whose client gave up (cancelled future) is not scored.
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            try:
                self._score(batch)
            except BaseException as error:  # nothing may end this thread: report and go on
                log.exception("scoring failed")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(
                            error if isinstance(error, Exception) else RuntimeError(str(error))
                        )

    def _score(self, batch: list[_Pending]) -> None:
        """Decode (a request with a bad image fails alone, 4xx), then one forward pass."""
        valid = []
        for item in batch:
            try:
                item.decoded = decode_images(item.images, max_image_pixels=item.max_pixels)
                valid.append(item)
            except InvalidRequest as error:
                item.future.set_exception(error)
        if not valid:
            return
        detector = valid[0].model.detector
        images = [image for item in valid for image in item.decoded]
        predictions = detector.predict(images, batch_size=len(images))
        self.stats["batches"] = self.stats.get("batches", 0) + 1
        self.stats["requests"] = self.stats.get("requests", 0) + len(valid)
        self.stats["images"] = self.stats.get("images", 0) + len(images)
        self.stats["largest_batch_requests"] = max(
            self.stats.get("largest_batch_requests", 0), len(valid)
        )
        start = 0
        for item in valid:
            mine = predictions[start : start + len(item.decoded)]
            start += len(item.decoded)
            item.future.set_result(image_results(detector, item.decoded, mine, item.options))
