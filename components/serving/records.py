"""The record of served decisions: a bounded, append-only SQLite log written off the request path.

Each decision keeps its time, the image's SHA-256 and a thumbnail, score, threshold and
decision, the model's name, version and training data version, and for flagged images
the heatmap overlay. Full images are kept only as ``--keep-images`` asks. Requests never
wait for the log and never fail because of it: a full queue, a full disk or a broken file
drops the record, counts it and logs it, and scoring goes on.

Trimming: without shipping the local record is all there is, so the oldest beyond
``max_records`` are deleted. With shipping (``--ship-to``) the local record is the buffer
of what S3 has not got yet: only shipped decisions are trimmed for ``max_records``, and a
decision not yet shipped is deleted only beyond the hard cap ``max_unshipped`` (a long S3
outage must not fill the pod's disk); those are counted, logged with their time range and
shown in ``/status``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 128
SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    sha256 TEXT NOT NULL,
    score REAL NOT NULL,
    threshold REAL,
    is_anomalous INTEGER,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    data_version TEXT,
    thumbnail BLOB,
    image BLOB,
    overlay BLOB
);
CREATE INDEX IF NOT EXISTS decisions_time ON decisions (time);
CREATE TABLE IF NOT EXISTS shipped (destination TEXT PRIMARY KEY, last_id INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS verdicts (
    decision_id INTEGER PRIMARY KEY REFERENCES decisions (id),
    verdict TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    time REAL NOT NULL,
    confirms INTEGER NOT NULL,
    mask BLOB,
    published_at REAL,
    published_as TEXT
);
"""
DROP_WARNING_INTERVAL = 60.0  # seconds: drops in between are summed into one warning
COLUMNS = (
    "id", "time", "sha256", "score", "threshold", "is_anomalous", "model_name",
    "model_version", "data_version",
)  # fmt: skip


class KeepImages(str, Enum):
    """Which full images the record keeps (thumbnails are always kept)."""

    NONE = "none"
    FLAGGED = "flagged"
    ALL = "all"


@dataclass(frozen=True)
class RecordSettings:
    path: Path
    keep_images: KeepImages = KeepImages.FLAGGED
    max_records: int = 100_000  # beyond this the oldest (with shipping: shipped) are deleted
    queue_size: int = 256  # decisions waiting for the writer; more are dropped and counted
    ship_to: str | None = None  # s3://bucket/prefix: shipped there as Parquet (shipping.py)
    ship_interval: float = 60.0  # seconds between shipments
    # With shipping: the most decisions not yet shipped the record holds (None: twice
    # max_records). It bounds the disk during an outage; older unshipped ones are dropped.
    max_unshipped: int | None = None

    @property
    def unshipped_cap(self) -> int:
        return self.max_unshipped if self.max_unshipped is not None else 2 * self.max_records


@dataclass
class Served:
    """One served image's decision, as the request path hands it over (no work done yet)."""

    image: bytes
    score: float
    threshold: float | None
    is_anomalous: bool | None
    anomaly_map: np.ndarray | None
    model_name: str
    model_version: str
    data_version: str | None
    time: float = field(default_factory=time.time)


class DecisionLog:
    """One writer thread behind a bounded queue; ``submit`` never blocks. A ``shipper``
    (``shipping.RecordShipper``) copies the record to S3 and shares the counts; with one,
    ``dropped_unshipped`` counts the decisions deleted over ``max_unshipped`` unshipped."""

    def __init__(self, settings: RecordSettings, *, shipper=None) -> None:
        self.settings = settings
        self.counts = {"recorded": 0, "dropped": 0, "failed": 0}
        self.shipper = shipper
        self._shipped_to: str | None = None  # the shipper's destination in table ``shipped``
        self._unwarned: list = [0, None, None]  # dropped unshipped since the last warning
        self._warned_at: float | None = None
        if shipper is not None:
            self.counts |= shipper.counts | {"dropped_unshipped": 0}
            shipper.counts = self.counts  # one set of counts for /metrics and /status
            self._shipped_to = str(shipper.location)
        self._queue: queue.Queue[Served | None] = queue.Queue(maxsize=settings.queue_size)
        self._thread = threading.Thread(target=self._write, name="fod-records", daemon=True)
        self._thread.start()
        if shipper is not None:
            shipper.start()

    def submit(self, served: list[Served]) -> None:
        for item in served:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.counts["dropped"] += 1
                if self.counts["dropped"] in (1, 10, 100) or self.counts["dropped"] % 1000 == 0:
                    log.warning("decision record queue full: %d dropped", self.counts["dropped"])

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, ship what is written, then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        else:
            self._thread.join(timeout)
        if self.shipper is not None:
            self.shipper.close()

    def _write(self) -> None:
        connection = None
        while (item := self._queue.get()) is not None:
            try:
                if connection is None:
                    connection = open_record(self.settings.path)
                connection.execute(
                    "INSERT INTO decisions (time, sha256, score, threshold, is_anomalous, "
                    "model_name, model_version, data_version, thumbnail, image, overlay) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    self._row(item),
                )
                dropped = self._trim(connection)  # in the same transaction: limits hold
                connection.commit()
                self.counts["recorded"] += 1
                self._dropped_unshipped(dropped)
            except Exception as error:  # a full disk, a locked or broken file: never fatal
                self.counts["failed"] += 1
                log.warning("could not record a decision (%s: %s)", type(error).__name__, error)
                if connection is not None:
                    connection.close()
                connection = None  # reopened for the next one
        if connection is not None:
            connection.close()
        self._warn_dropped()  # drops not yet in a warning are logged before the end

    def _row(self, item: Served) -> tuple:
        from fod_core.processing import read_image

        image = read_image(item.image, max_pixels=1 << 40)  # checked on the request path
        thumbnail = image.copy()
        thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        flagged = bool(item.is_anomalous)
        keep = self.settings.keep_images
        overlay = None
        if flagged and item.anomaly_map is not None:
            from fod_core.visualize import prediction_overlay

            overlay = _png(prediction_overlay(image, item.anomaly_map, item.threshold))
        kept = keep is KeepImages.ALL or (keep is KeepImages.FLAGGED and flagged)
        return (
            item.time,
            hashlib.sha256(item.image).hexdigest(),
            float(item.score),
            item.threshold,
            None if item.is_anomalous is None else int(item.is_anomalous),
            item.model_name,
            str(item.model_version),
            item.data_version,
            _png(thumbnail),
            item.image if kept else None,
            overlay,
        )

    def _trim(self, connection: sqlite3.Connection) -> tuple[int, float, float] | None:
        """Delete the oldest decisions beyond ``max_records``. Without shipping that is all
        (the local record is the only copy to keep bounded). With shipping only shipped ones
        go for ``max_records``: the unshipped are S3's only source; they go only beyond the
        hard cap, and then (count, first time, last time) of those dropped is returned."""
        # A decision with a verdict not yet published stays: its image is still to be used.
        unpublished = "id NOT IN (SELECT decision_id FROM verdicts WHERE published_at IS NULL)"
        (newest,) = connection.execute("SELECT MAX(id) FROM decisions").fetchone()
        if newest is None:
            return None
        limit = newest - self.settings.max_records  # ids are consecutive: the oldest go
        dropped = None
        if self._shipped_to is not None:
            row = connection.execute(
                "SELECT last_id FROM shipped WHERE destination = ?", (self._shipped_to,)
            ).fetchone()
            shipped = row[0] if row else 0
            limit = min(limit, shipped)
            over = newest - self.settings.unshipped_cap  # unshipped up to here are over the cap
            if over > shipped:
                where = f"id > ? AND id <= ? AND {unpublished}"
                count, first, last = connection.execute(
                    f"SELECT COUNT(*), MIN(time), MAX(time) FROM decisions WHERE {where}",
                    (shipped, over),
                ).fetchone()
                if count:  # a shipment in flight may have read some: a loss is never understated
                    connection.execute(f"DELETE FROM decisions WHERE {where}", (shipped, over))
                    dropped = (count, first, last)
        connection.execute(f"DELETE FROM decisions WHERE id <= ? AND {unpublished}", (limit,))
        return dropped

    def _dropped_unshipped(self, dropped: tuple[int, float, float] | None) -> None:
        """Count decisions dropped unshipped; warn at once, then at most once a minute with
        the sum of what was dropped in between (a long outage drops one per decision)."""
        unwarned = self._unwarned
        if dropped:
            count, first, last = dropped
            self.counts["dropped_unshipped"] += count
            unwarned[0] += count
            unwarned[1] = first if unwarned[1] is None else min(unwarned[1], first)
            unwarned[2] = last if unwarned[2] is None else max(unwarned[2], last)
        now = time.monotonic()
        if unwarned[0] and (
            self._warned_at is None or now - self._warned_at >= DROP_WARNING_INTERVAL
        ):
            self._warn_dropped()
            self._warned_at = now

    def _warn_dropped(self) -> None:
        count, first, last = self._unwarned
        if not count:
            return
        log.warning(
            "decision record: dropped unshipped decisions: %d, served from %s to %s, never "
            "shipped to %s: more than %d waited (is S3 down?); %d dropped so far",
            count, _utc(first), _utc(last), self._shipped_to, self.settings.unshipped_cap,
            self.counts["dropped_unshipped"],
        )  # fmt: skip
        self._unwarned = [0, None, None]


def open_record(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=5)
    connection.execute("PRAGMA journal_mode=WAL")  # readers (fod monitor) never block it
    connection.executescript(SCHEMA)
    return connection


def read_decisions(path: str | Path, *, since: float | None = None) -> list[dict]:
    """The recorded decisions (without image blobs), oldest first."""
    connection = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=5)
    try:
        rows = connection.execute(
            f"SELECT {', '.join(COLUMNS)} FROM decisions WHERE time >= ? ORDER BY id",
            (since or 0.0,),
        ).fetchall()
    finally:
        connection.close()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
