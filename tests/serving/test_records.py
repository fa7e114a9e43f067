"""The decision record and the metrics of a real model server: nothing lost under load,
limits that hold, and a broken store that never fails a request."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_kit import start_server

from components.local.processes import stop_server
from components.serving.records import (
    DecisionLog,
    KeepImages,
    RecordSettings,
    Served,
    open_record,
    read_decisions,
)


def wait_for_records(server, count: int, timeout: float = 30.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = (server.status() or {}).get("records", {})
        if records.get("recorded", 0) + records.get("failed", 0) >= count:
            return records
        time.sleep(0.2)
    raise AssertionError(f"records did not reach {count}: {server.status()}")


def metric(server, name: str) -> float:
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


@pytest.fixture(scope="module")
def recording(model_a, tmp_path_factory):
    home = tmp_path_factory.mktemp("record-home")
    record = home / "records" / "fod-widget.sqlite"
    running = start_server(
        home, str(model_a), "fod-widget", "--model-version", "7", "--poll-interval", "0",
        "--record", str(record), "--keep-images", "flagged", "--max-batch", "8",
    )  # fmt: skip
    yield running, record
    stop_server(running)


def test_every_decision_of_16_concurrent_clients_is_recorded(recording, test_images) -> None:
    server, record = recording
    images = [p.read_bytes() for p in test_images]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: server.predict([images[i % len(images)]]), range(48)))
    assert wait_for_records(server, 48) == {"path": str(record), "recorded": 48, "dropped": 0,
                                             "failed": 0}  # fmt: skip
    rows = read_decisions(record)
    assert len(rows) == 48
    assert {r["model_version"] for r in rows} == {"7"} and {r["model_name"] for r in rows} == {
        "fod-widget"
    }
    import hashlib

    digests = {hashlib.sha256(i).hexdigest() for i in images}
    assert {r["sha256"] for r in rows} == digests
    scores = sorted(a[0]["score"] for a in answers)
    assert sorted(r["score"] for r in rows) == pytest.approx(scores)
    with open_record(record) as connection:
        kept = connection.execute(
            "SELECT is_anomalous, image IS NOT NULL, overlay IS NOT NULL, length(thumbnail) "
            "FROM decisions"
        ).fetchall()
    assert all((flag == 1) == has_image == has_overlay for flag, has_image, has_overlay, _ in kept)
    assert all(size > 100 for *_, size in kept)  # a PNG thumbnail


def test_metrics_count_decisions_and_decode_errors(recording, test_images) -> None:
    server, _ = recording
    before = metric(server, "fod_decisions_total")
    server.predict([test_images[0].read_bytes()])
    assert metric(server, "fod_decisions_total") == before + 1
    assert metric(server, "fod_score_count") >= before + 1
    assert metric(server, "fod_request_seconds_count") > 0
    assert metric(server, 'fod_served_version{model="fod-widget",version="7"}') == 1
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.predict([b"not an image"])
    assert refused.value.code == 400
    assert metric(server, "fod_decode_errors_total") == 1


def test_a_broken_store_never_fails_a_request(model_a, tmp_path, test_images) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the record's folder cannot be made under a file")
    server = start_server(
        tmp_path, str(model_a), "fod-widget", "--poll-interval", "0",
        "--record", str(blocker / "records" / "r.sqlite"),
    )  # fmt: skip
    try:
        answers = [server.predict([test_images[0].read_bytes()]) for _ in range(3)]
        assert all(len(a) == 1 and a[0]["score"] > 0 for a in answers)
        records = wait_for_records(server, 3)
        assert records["failed"] == 3 and records["recorded"] == 0
    finally:
        stop_server(server)


def test_without_shipping_the_record_keeps_max_records_and_drops_rather_than_waits(
    tmp_path, test_images
) -> None:
    """Nothing is shipped, so the local record is all there is: the oldest beyond
    max_records go. With shipping, unshipped ones stay (test_shipping.py)."""
    image = test_images[0].read_bytes()

    def served(score: float) -> Served:
        return Served(image, score, 0.5, score >= 0.5, None, "fod-widget", "1", "abc")

    log = DecisionLog(RecordSettings(tmp_path / "r.sqlite", KeepImages.NONE, max_records=5))
    log.submit([served(i / 10) for i in range(12)])
    log.close()
    rows = read_decisions(tmp_path / "r.sqlite")
    assert [r["score"] for r in rows] == pytest.approx([0.7, 0.8, 0.9, 1.0, 1.1])
    assert log.counts == {"recorded": 12, "dropped": 0, "failed": 0}
    # A writer stuck on a locked database: the queue fills, and submit drops, never waits.
    locked = open_record(tmp_path / "q.sqlite")
    locked.execute("BEGIN EXCLUSIVE")
    stuck = DecisionLog(RecordSettings(tmp_path / "q.sqlite", queue_size=1))
    stuck.submit([served(0.1)])
    queued = 1
    while not stuck._queue.full():  # the writer may have taken the first one already
        stuck._queue.put_nowait(served(0.1))
        queued += 1
    stuck.submit([served(0.2)] * 3)  # returns: the queue is full, the writer stuck
    # The writer gives up on the lock after its 5 s busy timeout (counted failed) and may
    # have freed a slot on a loaded machine: drops are counted, and nothing goes uncounted.
    assert stuck.counts["dropped"] >= 1
    locked.rollback()
    locked.close()
    stuck.close()
    counts = stuck.counts
    assert counts["recorded"] + counts["failed"] + counts["dropped"] == queued + 3
    assert json.dumps(stuck.counts)  # plain numbers, for the status route
