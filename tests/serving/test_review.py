"""The review page's server: the queue of flagged parts, verdicts with who and when, the
counts per version, refusals that lose nothing, and publishing a new data version."""

from __future__ import annotations

import io

import requests
from conftest import png
from PIL import Image

from components.data_version import read_data_version


def verdict(url: str, decision: int, value: str, reviewer: str = "ana", **files):
    return requests.post(
        f"{url}/api/decisions/{decision}/verdict",
        data={"verdict": value, "reviewer": reviewer},
        files=files or None,
        timeout=30,
    )


def test_the_queue_shows_flagged_parts_newest_first_with_their_overlay(review) -> None:
    queue = requests.get(f"{review}/api/queue", timeout=10).json()
    assert len(queue) >= 2 and [q["id"] for q in queue] == sorted(q["id"] for q in queue)[::-1]
    first = queue[0]
    assert first["model_version"] == "3" and first["has_image"] and first["score"] > 0
    overlay = requests.get(f"{review}/api/decisions/{first['id']}/overlay.png", timeout=10)
    assert overlay.status_code == 200 and Image.open(io.BytesIO(overlay.content)).size[0] > 0
    page = requests.get(review, timeout=10).text
    assert "Review: widget" in page and "api/queue" in page


def test_verdicts_counts_refusals_and_a_new_data_version(review, review_repo) -> None:
    queue = requests.get(f"{review}/api/queue", timeout=10).json()
    good, bad = queue[0]["id"], queue[1]["id"]
    answer = verdict(review, good, "good")
    assert answer.status_code == 200 and answer.json()["confirms"] is False  # a false alarm
    answer = verdict(review, bad, "defective", mask=("mask.png", png(Image.new("L", (64, 64)))))
    assert answer.status_code == 200 and answer.json()["confirms"] is True
    # Refused, and nothing lost: a double verdict, an unknown image, bad values.
    assert verdict(review, good, "defective").status_code == 409
    assert verdict(review, 9999, "good").status_code == 404
    assert verdict(review, queue[-1]["id"], "maybe").status_code == 400
    assert verdict(review, queue[-1]["id"], "good", reviewer=" ").status_code == 400
    refused = verdict(review, queue[-1]["id"], "defective", mask=("m.png", b"not an image"))
    assert refused.status_code == 400 and "not an image" in refused.json()["error"]
    waiting = [q["id"] for q in requests.get(f"{review}/api/queue", timeout=10).json()]
    assert good not in waiting and bad not in waiting and queue[-1]["id"] in waiting
    (counts,) = requests.get(f"{review}/api/counts", timeout=10).json()
    assert counts["reviewed"] == 2 and counts["confirmed_false_alarms"] == 1
    assert counts["confirmed_defects"] == 1 and counts["false_alarm_rate_seen"] == 1 / 3

    before = read_data_version(review_repo / "data.dvc").md5
    published = requests.post(f"{review}/api/publish", timeout=120).json()
    assert published["good"] == 1 and published["defective"] == 1
    assert published["data_version"] != before
    assert read_data_version(review_repo / "data.dvc").md5 == published["data_version"]
    good_images = list((review_repo / "data/widget/train/good").glob("review-*.png"))
    labelled = list((review_repo / "data/widget/labelled").glob("*/review-*.png"))
    assert len(good_images) == 1 and len(labelled) == 1
    assert list((review_repo / "data/widget/labelled").glob("*/masks/review-*.png"))
    again = requests.post(f"{review}/api/publish", timeout=60).json()
    assert again["good"] == 0 and again["data_version"] is None  # published once
