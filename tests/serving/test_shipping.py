"""The decision record of a cluster's model server, shipped to S3 as Parquet: a real server
process and the embedded stack's real SeaweedFS; an S3 that is down (a port nothing
listens on) never fails a request and loses nothing; monitor and the review page read it.
Outages that end are a relay in front of SeaweedFS that is cut and restored."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import re
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import pytest
from serving_kit import start_server
from test_records import metric

from components.local.processes import free_port, stop_server
from components.serving.records import (
    DecisionLog,
    KeepImages,
    RecordSettings,
    Served,
    read_decisions,
)
from components.serving.shipping import (
    RecordShipper,
    S3Location,
    ShippingError,
    import_shipped,
    read_shipped,
)
from components.settings import StackSettings


class S3Link:
    """A TCP relay to the stack's S3 on a port of its own: ``cut`` is an outage (connections
    refused and dropped, as when S3 is down), ``restore`` ends it on the same port, so one
    client (a server process's too) sees S3 go away and come back."""

    def __init__(self, target: str) -> None:
        parsed = urlparse(target)
        self.target = (parsed.hostname, parsed.port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for connection in self._open:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target, timeout=10)
            except (TimeoutError, OSError):
                continue
            upstream.settimeout(None)
            self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def served(first: int, last: int, *, start: float = 1_700_000_000.0) -> list[Served]:
    """Decisions ``first``..``last - 1`` of a small gray part, served one second apart."""
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 120, 150)).save(buffer, "PNG")
    return [Served(buffer.getvalue(), 0.01 * i, 0.5, False, None, "fod-gadget", "1", "d",
                   time=start + i) for i in range(first, last)]  # fmt: skip


def written(log: DecisionLog, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while log.counts["recorded"] + log.counts["failed"] < count:
        assert time.monotonic() < deadline, f"not written: {log.counts}"
        time.sleep(0.05)
    assert log.counts["failed"] == 0


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def wait_for(server, state: str, count: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = (server.status() or {}).get("records", {})
        if records.get(state, 0) >= count:
            return records
        time.sleep(0.2)
    raise AssertionError(f"{state} did not reach {count}: {server.status()}")


def test_a_server_ships_its_decisions_where_monitor_and_review_read_them(
    stack, settings, model_a, test_images, tmp_path
):
    from components.monitoring import monitor
    from components.review import ReviewStore

    location = f"s3://{settings.bucket}/shipped-records"
    record = tmp_path / "pod" / "decisions.sqlite"
    server = start_server(
        tmp_path, str(model_a), "fod-widget", "--model-version", "3", "--poll-interval", "0",
        "--record", str(record), "--ship-to", location, "--ship-interval", "0.5",
    )  # fmt: skip
    try:
        images = [p.read_bytes() for p in test_images]
        answers = [server.predict([images[i % len(images)]])[0] for i in range(10)]
        records = wait_for(server, "shipped", 10)
        assert records["shipped_to"] == location and records["ship_failed"] == 0
        assert metric(server, "fod_decision_records") >= 20  # 10 recorded + 10 shipped
    finally:
        stop_server(server)

    shipped = read_shipped(location, "fod-widget")
    assert len(shipped) == 10
    assert [r["score"] for r in shipped] == pytest.approx([a["score"] for a in answers])
    assert {r["sha256"] for r in shipped} == {hashlib.sha256(i).hexdigest() for i in images}
    assert {r["model_version"] for r in shipped} == {"3"}
    keys = [
        o["Key"]
        for o in settings.s3_client().list_objects_v2(
            Bucket=settings.bucket, Prefix="shipped-records/fod-widget/date="
        )["Contents"]
    ]
    assert keys and all(k.endswith(".parquet") for k in keys)
    assert read_shipped(location, "fod-widget", since=time.time() + 60) == []

    report = monitor("widget", record=location, model_dir=model_a, track=False)
    assert report["record"] == location and report["decisions"] == 10
    assert [v["model_version"] for v in report["versions"]] == ["3"]

    # The review page's own record: each decision once, its flagged ones in the queue.
    review = tmp_path / "review" / "record.sqlite"
    assert import_shipped(location, "fod-widget", review) == 10
    assert import_shipped(location, "fod-widget", review) == 0
    flagged = [a for a in answers if a["is_anomalous"]]
    assert len(ReviewStore(review).queue()) == len(flagged)


def test_an_s3_outage_loses_nothing_and_the_next_shipment_catches_up(stack, settings, tmp_path):
    import numpy as np
    from PIL import Image

    from components.review import ReviewStore
    from components.serving.records import Served

    record = tmp_path / "decisions.sqlite"
    log = DecisionLog(RecordSettings(record, KeepImages.NONE))
    image = Image.new("RGB", (32, 32), (90, 120, 150))
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    heat = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    log.submit([Served(buffer.getvalue(), 0.1 * i, 0.5, i >= 5, heat, "fod-gadget", "1", "d")
                for i in range(7)])  # fmt: skip
    log.close()
    assert len(read_decisions(record)) == 7

    location = f"s3://{settings.bucket}/outage-records"
    down = StackSettings(
        settings.mlflow_uri, settings.access_key, settings.secret_key,
        s3_endpoint=f"http://127.0.0.1:{free_port()}", bucket=settings.bucket,
    ).s3_client(retries=0, timeout=2)  # fmt: skip
    shipper = RecordShipper(record, location, source="pod-a", client=down)
    assert shipper.ship_all() == 0 and shipper.ship_all() == 0
    # Two failed attempts, however many decisions wait (not 7 rows x 2 retries).
    assert shipper.counts == {"shipped": 0, "ship_failed": 2, "pending": 7}
    assert shipper.pending() == 7  # kept for the next shipment

    shipper = RecordShipper(record, location, source="pod-a", client=settings.s3_client())
    assert shipper.ship_all() == 7 and shipper.pending() == 0
    assert shipper.ship_all() == 0  # nothing twice
    rows = read_shipped(location, "fod-gadget", client=settings.s3_client())
    assert [r["score"] for r in rows] == pytest.approx([0.1 * i for i in range(7)])

    # Shipped twice (a shipment that half failed): the review page still copies each once.
    RecordShipper(record, location, source="pod-a", client=settings.s3_client()).ship_all()
    review = tmp_path / "review.sqlite"
    assert import_shipped(location, "fod-gadget", review, client=settings.s3_client()) == 7
    queue = ReviewStore(review).queue()
    assert [q["score"] for q in queue] == pytest.approx([0.6, 0.5])  # flagged, newest first
    assert ReviewStore(review).picture(queue[0]["id"], "overlay").startswith(b"\x89PNG")


def test_an_outage_past_max_records_keeps_every_unshipped_decision_until_s3_is_back(
    stack, settings, tmp_path
):
    """Without shipping, the oldest beyond max_records go (test_records.py); with shipping,
    only shipped ones do: 12 decisions during an outage with max_records 5 all stay and all
    reach S3 once it is back; then the record is trimmed to max_records again."""
    link = S3Link(settings.s3_endpoint)
    link.restore()
    client = dataclasses.replace(settings, s3_endpoint=link.url).s3_client(retries=0, timeout=2)
    location = f"s3://{settings.bucket}/long-outage"
    record = tmp_path / "decisions.sqlite"
    shipper = RecordShipper(record, location, source="pod-c", client=client, interval=3600)
    log = DecisionLog(
        RecordSettings(record, KeepImages.NONE, max_records=5, max_unshipped=50, ship_to=location),
        shipper=shipper,
    )
    try:
        log.submit(served(0, 3))
        written(log, 3)
        assert shipper.ship_all() == 3
        link.cut()  # S3 goes away
        log.submit(served(3, 15))
        written(log, 15)
        assert shipper.ship_all() == 0 and shipper.ship_all() == 0
        counts = {k: log.counts[k] for k in ("shipped", "ship_failed", "pending")}
        assert counts == {"shipped": 3, "ship_failed": 2, "pending": 12}  # attempts, not rows
        # The 3 shipped went to make room; not one of the 12 unshipped did.
        assert [r["id"] for r in read_decisions(record)] == list(range(4, 16))
        link.restore()  # S3 is back
        assert shipper.ship_all() == 12 and log.counts["pending"] == 0
        log.submit(served(15, 16))
        written(log, 16)
        assert [r["id"] for r in read_decisions(record)] == list(range(12, 17))  # 5 again
    finally:
        log.close()
        link.cut()
    assert log.counts["shipped"] == 16 and log.counts["dropped_unshipped"] == 0
    rows = read_shipped(location, "fod-gadget", client=settings.s3_client())
    assert [r["id"] for r in rows] == list(range(1, 17))
    assert [r["score"] for r in rows] == pytest.approx([0.01 * i for i in range(16)])


def test_past_the_hard_cap_the_oldest_unshipped_are_dropped_counted_and_logged(
    stack, settings, tmp_path, caplog
):
    """An outage longer than the disk allows (max_unshipped): the oldest unshipped go, and
    each one is counted and named by time in a warning; the rest are shipped when S3 is
    back."""
    link = S3Link(settings.s3_endpoint)  # down from the start
    client = dataclasses.replace(settings, s3_endpoint=link.url).s3_client(retries=0, timeout=2)
    location = f"s3://{settings.bucket}/over-the-cap"
    record = tmp_path / "decisions.sqlite"
    shipper = RecordShipper(record, location, source="pod-d", client=client, interval=3600)
    settings_ = RecordSettings(record, KeepImages.NONE, max_records=2, max_unshipped=5,
                               ship_to=location)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="components.serving.records"):
        log = DecisionLog(settings_, shipper=shipper)
        log.submit(served(0, 12))
        written(log, 12)
        assert shipper.ship_all() == 0 and log.counts["pending"] == 5
        assert [r["id"] for r in read_decisions(record)] == list(range(8, 13))
        assert log.counts["dropped_unshipped"] == 7
        link.restore()
        log.close()  # the last shipment goes out, and drops not yet logged are logged
    link.cut()
    warnings = [
        re.search(r"dropped unshipped decisions: (\d+), served from ([^ ]+) to ([^,]+),", r.message)
        for r in caplog.records
    ]
    dropped = [m.groups() for m in warnings if m]
    assert sum(int(count) for count, _, _ in dropped) == 7
    assert dropped[0][1] == iso(1_700_000_000) and dropped[-1][2] == iso(1_700_000_006)
    rows = read_shipped(location, "fod-gadget", client=settings.s3_client())
    assert [r["id"] for r in rows] == list(range(8, 13)) and log.counts["shipped"] == 5


def test_a_server_whose_s3_is_down_answers_every_request_and_ships_when_it_is_back(
    stack, settings, model_a, test_images, tmp_path
):
    """A real server, its S3 down: every request is answered; past max_records it keeps
    the unshipped decisions up to --max-unshipped, says in /status, /metrics and its log
    which it had to drop, and ships the rest once S3 is back."""
    import os

    from components.local.processes import ServerState, wait_healthy
    from components.local.servers import spawn_model_server

    link = S3Link(settings.s3_endpoint)  # down from the start
    location = f"s3://{settings.bucket}/server-outage"
    record = tmp_path / "decisions.sqlite"
    env = dict(os.environ) | {"FOD_S3_ENDPOINT": link.url}
    server = spawn_model_server(
        tmp_path, "fod-widget", str(model_a), http_port=free_port(), grpc_port=free_port(),
        extra=("--poll-interval", "0", "--record", str(record), "--ship-to", location,
               "--ship-interval", "0.2", "--max-records", "5", "--max-unshipped", "10"),
        env=env,
    )  # fmt: skip
    try:
        wait_healthy("fod-widget", ServerState(pid=server.pid, log=server.log),
                     lambda: bool(server.status()), timeout=120)  # fmt: skip
        images = [p.read_bytes() for p in test_images]
        started = iso(time.time() - 1)
        answers = [server.predict([images[i % len(images)]])[0] for i in range(12)]
        assert all(a["score"] >= 0 for a in answers)
        wait_for(server, "recorded", 12)
        failed = wait_for(server, "ship_failed", 1)["ship_failed"]
        records = wait_for(server, "ship_failed", failed + 2)  # one begun after the 12th
        assert records["shipped"] == 0 and records["pending"] == 10
        assert records["dropped_unshipped"] == 2 and records["max_unshipped"] == 10
        assert len(read_decisions(record)) == 10  # not trimmed to 5: none was shipped
        assert metric(server, 'fod_decisions_dropped_total{model="fod-widget",'
                              'reason="unshipped_over_cap"}') == 2  # fmt: skip
        assert metric(server, "fod_decisions_dropped_total") == 2  # nothing else lost
        warned = re.search(r"dropped unshipped decisions: 1, served from ([^ ]+) to \1,",
                           Path(server.log).read_text())  # fmt: skip
        assert warned and started <= warned[1] <= iso(time.time())  # the first one's time

        link.restore()
        records = wait_for(server, "shipped", 10)
        assert records["pending"] == 0
        log_text = Path(server.log).read_text()
        assert records["ship_failed"] == log_text.count("could not ship ")  # one per attempt
        server.predict([images[0]])
        wait_for(server, "shipped", 11)
        assert len(read_decisions(record)) == 5  # shipped: trimmed to max_records again
    finally:
        stop_server(server)
        link.cut()
    rows = read_shipped(location, "fod-widget", client=settings.s3_client())
    assert [r["id"] for r in rows] == list(range(3, 14))
    assert [r["score"] for r in rows[:10]] == pytest.approx([a["score"] for a in answers[2:]])


def test_a_backlog_that_cannot_be_counted_is_an_error_not_zero(tmp_path, caplog):
    """A record that cannot be read (here: not SQLite, as after a torn copy) has an unknown
    backlog: pending() raises, and a shipping round counts the failure and logs both."""
    import sqlite3

    record = tmp_path / "decisions.sqlite"
    record.write_bytes(b"not a SQLite file " * 100)
    shipper = RecordShipper(record, "s3://fod/records", source="pod-e")
    with pytest.raises(sqlite3.DatabaseError):
        shipper.pending()
    with caplog.at_level(logging.WARNING, logger="components.serving.shipping"):
        assert shipper.ship_all() == 0
    assert shipper.counts["ship_failed"] == 1
    assert "could not count the decisions waiting to be shipped" in caplog.text
    assert "could not ship an unknown number of decisions" in caplog.text


def test_a_wrong_location_is_a_clear_error():
    for wrong in ("/var/records", "s3://", "gs://bucket/records"):
        with pytest.raises(ShippingError, match=r"S3 location|names no bucket"):
            S3Location.parse(wrong)
    assert str(S3Location.parse("s3://fod/records/")) == "s3://fod/records"
