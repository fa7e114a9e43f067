"""The decision record of a cluster's model server, shipped to S3 as Parquet: a real server
process and the embedded stack's real SeaweedFS; an S3 that is down (a port nothing
listens on) never fails a request and loses nothing; monitor and the review page read it."""

from __future__ import annotations

import hashlib
import time

import pytest
from conftest import start_server
from test_records import metric

from components.local.processes import free_port, stop_server
from components.serving.records import DecisionLog, KeepImages, RecordSettings, read_decisions
from components.serving.shipping import (
    RecordShipper,
    S3Location,
    ShippingError,
    import_shipped,
    read_shipped,
)
from components.settings import StackSettings


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
    assert shipper.ship_all() == 0
    assert shipper.counts == {"shipped": 0, "ship_failed": 7}
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


def test_a_server_whose_s3_is_down_answers_every_request(stack, model_a, test_images, tmp_path):
    import os

    record = tmp_path / "decisions.sqlite"
    env = dict(os.environ) | {"FOD_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    from components.local.processes import ServerState, wait_healthy
    from components.local.servers import spawn_model_server

    server = spawn_model_server(
        tmp_path, "fod-widget", str(model_a), http_port=free_port(), grpc_port=free_port(),
        extra=("--poll-interval", "0", "--record", str(record), "--ship-to",
               "s3://fod/records", "--ship-interval", "0.2"),
        env=env,
    )  # fmt: skip
    try:
        wait_healthy("fod-widget", ServerState(pid=server.pid, log=server.log),
                     lambda: bool(server.status()), timeout=120)  # fmt: skip
        image = test_images[0].read_bytes()
        for _ in range(5):
            assert server.predict([image])[0]["score"] >= 0
        records = wait_for(server, "ship_failed", 1)
        assert records["recorded"] == 5 and records["shipped"] == 0
    finally:
        stop_server(server)
    assert len(read_decisions(record)) == 5  # all kept for when S3 is back


def test_a_wrong_location_is_a_clear_error():
    for wrong in ("/var/records", "s3://", "gs://bucket/records"):
        with pytest.raises(ShippingError, match=r"S3 location|names no bucket"):
            S3Location.parse(wrong)
    assert str(S3Location.parse("s3://fod/records/")) == "s3://fod/records"
