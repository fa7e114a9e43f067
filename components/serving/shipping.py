"""The decision record in S3, as Parquet: how a model server in a pod, whose disk goes
with the pod, keeps its decisions where ``fod monitor`` and ``fod review`` read them.

The server's local SQLite record stays the buffer. Every ``interval`` seconds the decisions
written since the last shipment go to S3, one Parquet object per model::

    s3://<bucket>/<prefix>/<model>/date=<YYYY-MM-DD>/<source>-<first id>-<last id>.parquet

``source`` is the writer (the pod's host name): replicas never overwrite each other. An S3
outage is logged and counted (one failed attempt per round); the same decisions go with
the next shipment, and requests never wait for it. Meanwhile the record keeps every
unshipped decision up to its hard cap (records.py). A shipment that half failed may be
shipped twice: readers keep one row per (source, id).
"""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from components.errors import ServingError
from components.serving.records import COLUMNS, RecordSettings, open_record

log = logging.getLogger(__name__)

BLOBS = ("thumbnail", "image", "overlay")
SHIPPED_SCHEMA = """
CREATE TABLE IF NOT EXISTS imported (
    source TEXT NOT NULL, source_id INTEGER NOT NULL, PRIMARY KEY (source, source_id)
);
CREATE TABLE IF NOT EXISTS imported_objects (key TEXT PRIMARY KEY);
"""
DEFAULT_INTERVAL = 60.0
MAX_ROWS_PER_SHIPMENT = 5_000


class ShippingError(ServingError):
    """A destination that is not an s3:// URI."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not str(uri).startswith("s3://"):
            raise ShippingError(f"{uri!r} is not an S3 location (s3://bucket/prefix)")
        bucket, _, prefix = str(uri)[len("s3://") :].partition("/")
        if not bucket:
            raise ShippingError(f"{uri!r} names no bucket")
        return cls(bucket, prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def is_s3(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def _s3_client(client=None):
    if client is not None:
        return client
    from components.settings import load_settings

    return load_settings().s3_client(retries=1, timeout=10.0)


def _day(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


class RecordShipper:
    """Ships new decisions of a local record every ``interval`` seconds, off the request
    path. ``counts`` gains ``shipped`` (decisions), ``ship_failed`` (failed attempts: a
    long outage is not multiplied by the backlog) and ``pending`` (decisions not yet
    shipped, as of the last attempt)."""

    def __init__(
        self,
        record: str | Path,
        destination: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        source: str | None = None,
        counts: dict | None = None,
        client=None,
    ) -> None:
        self.record = Path(record)
        self.location = S3Location.parse(destination)
        self.interval = interval
        self.source = source or socket.gethostname()
        self.counts = counts if counts is not None else {}
        self.counts.setdefault("shipped", 0)
        self.counts.setdefault("ship_failed", 0)
        self.counts.setdefault("pending", 0)
        self._client = client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ship(self) -> int:
        """Ship what is new; the number of decisions shipped. Raises when S3 refuses (the
        decisions stay for the next shipment)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.record.is_file():
            return 0
        connection = open_record(self.record)
        try:
            row = connection.execute(
                "SELECT last_id FROM shipped WHERE destination = ?", (str(self.location),)
            ).fetchone()
            columns = (*COLUMNS, *BLOBS)
            rows = connection.execute(
                f"SELECT {', '.join(columns)} FROM decisions WHERE id > ? ORDER BY id LIMIT ?",
                (row[0] if row else 0, MAX_ROWS_PER_SHIPMENT),
            ).fetchall()
            if not rows:
                return 0
            client = self._client = _s3_client(self._client)
            by_model: dict[str, list[tuple]] = {}
            for r in rows:
                by_model.setdefault(r[columns.index("model_name")], []).append(r)
            for model_name, group in by_model.items():
                table = pa.table(
                    {"source": [self.source] * len(group)}
                    | {c: [r[i] for r in group] for i, c in enumerate(columns)}
                )
                body = io.BytesIO()
                pq.write_table(table, body, compression="zstd")
                first, last = group[0][0], group[-1][0]
                key = self.location.key(
                    model_name,
                    f"date={_day(group[-1][1])}",
                    f"{self.source}-{first:012d}-{last:012d}.parquet",
                )
                client.put_object(Bucket=self.location.bucket, Key=key, Body=body.getvalue())
            connection.execute(
                "INSERT INTO shipped (destination, last_id) VALUES (?, ?) "
                "ON CONFLICT (destination) DO UPDATE SET last_id = excluded.last_id",
                (str(self.location), rows[-1][0]),
            )
            connection.commit()
            return len(rows)
        finally:
            connection.close()

    def ship_all(self) -> int:
        """Ship until nothing is left (or S3 refuses): counted, never raised."""
        total = 0
        while True:
            try:
                shipped = self.ship()
            except Exception as error:  # an S3 outage, a full disk: the next round retries
                pending = self._count_pending()  # before the count: /status stays consistent
                self.counts["ship_failed"] += 1  # one attempt, however many rows wait
                log.warning(
                    "could not ship %s decisions to %s (%s: %s); retrying in %.0f s",
                    pending, self.location, type(error).__name__, error, self.interval,
                )  # fmt: skip
                return total
            self.counts["shipped"] += shipped
            total += shipped
            if shipped < MAX_ROWS_PER_SHIPMENT:
                self._count_pending()
                return total

    def pending(self) -> int:
        """Decisions in the record not yet shipped; a record that cannot be read raises
        (an unknown backlog must not pass for an empty one)."""
        if not self.record.is_file():
            return 0  # nothing recorded yet
        connection = open_record(self.record)
        try:
            row = connection.execute(
                "SELECT COUNT(*) FROM decisions WHERE id > COALESCE("
                "(SELECT last_id FROM shipped WHERE destination = ?), 0)",
                (str(self.location),),
            ).fetchone()
            return int(row[0])
        finally:
            connection.close()

    def _count_pending(self) -> int | str:
        """Update ``counts["pending"]``; an error is logged and the count left as it was."""
        try:
            self.counts["pending"] = self.pending()
        except Exception as error:
            log.warning(
                "could not count the decisions waiting to be shipped from %s (%s: %s)",
                self.record, type(error).__name__, error,
            )  # fmt: skip
            return "an unknown number of"
        return self.counts["pending"]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fod-shipping", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop, after one last shipment of what is left (what is still unshipped then
        stays in the local record for a server started on it later)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.counts["pending"]:
            log.warning(
                "%d decisions were not shipped to %s; they stay in %s",
                self.counts["pending"], self.location, self.record,
            )  # fmt: skip

    def _loop(self) -> None:
        self._count_pending()  # a backlog left by an earlier server shows from the start
        while not self._stop.wait(self.interval):
            self.ship_all()
        self.ship_all()


def shipper_for(settings: RecordSettings) -> RecordShipper | None:
    """The shipper a record's settings ask for (``--ship-to``), or None."""
    if not settings.ship_to:
        return None
    return RecordShipper(settings.path, settings.ship_to, interval=settings.ship_interval)


# -- reading ----------------------------------------------------------------------------
def _objects(location: S3Location, model_name: str, client, since: float | None) -> Iterator[str]:
    """The Parquet keys of one model, oldest day first; days before ``since`` skipped."""
    prefix = location.key(model_name) + "/"
    first_day = f"date={_day(since)}" if since else ""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=location.bucket, Prefix=prefix
    ):
        for item in page.get("Contents", []):
            key = item["Key"]
            day = key[len(prefix) :].split("/", 1)[0]
            if key.endswith(".parquet") and day >= first_day:
                keys.append(key)
    return iter(sorted(keys))


def _read(client, bucket: str, key: str, columns: tuple[str, ...] | None) -> list[dict]:
    import pyarrow.parquet as pq

    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return pq.read_table(io.BytesIO(body), columns=list(columns) if columns else None).to_pylist()


def read_shipped(
    destination: str, model_name: str, *, since: float | None = None, client=None
) -> list[dict]:
    """One model's shipped decisions (without image blobs), oldest first, each once."""
    location = S3Location.parse(destination)
    client = _s3_client(client)
    seen: dict[tuple[str, int], dict] = {}
    for key in _objects(location, model_name, client, since):
        for row in _read(client, location.bucket, key, ("source", *COLUMNS)):
            if since is None or row["time"] >= since:
                seen.setdefault((row["source"], row["id"]), row)
    return sorted(seen.values(), key=lambda r: (r["time"], r["source"], r["id"]))


def import_shipped(destination: str, model_name: str, record: str | Path, *, client=None) -> int:
    """Copy the shipped decisions of one model that ``record`` (a review page's own SQLite
    file) does not have yet; the number copied. Objects read once are not read again."""
    location = S3Location.parse(destination)
    client = _s3_client(client)
    connection = open_record(record)
    copied = 0
    try:
        connection.executescript(SHIPPED_SCHEMA)
        done = {k for (k,) in connection.execute("SELECT key FROM imported_objects")}
        columns = (*COLUMNS[1:], *BLOBS)  # the local record numbers its own rows
        for key in _objects(location, model_name, client, None):
            if key in done:
                continue
            for row in _read(client, location.bucket, key, None):
                new = connection.execute(
                    "INSERT OR IGNORE INTO imported (source, source_id) VALUES (?, ?)",
                    (row["source"], row["id"]),
                ).rowcount
                if new:
                    connection.execute(
                        f"INSERT INTO decisions ({', '.join(columns)}) "
                        f"VALUES ({', '.join('?' * len(columns))})",
                        tuple(row[c] for c in columns),
                    )
                    copied += 1
            connection.execute("INSERT INTO imported_objects (key) VALUES (?)", (key,))
            connection.commit()  # one object at a time: an interrupted import resumes
    finally:
        connection.close()
    return copied
