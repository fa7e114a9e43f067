"""The review page's server: the queue of flagged parts, verdicts with who and when, the
counts per version, refusals that lose nothing, and publishing a new data version."""

from __future__ import annotations

import io

import requests
from PIL import Image
from serving_kit import png

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
    # 1 false alarm among the 2 reviewed parts; the 2 unreviewed say nothing (not 1 in 3).
    assert counts["confirmed_defects"] == 1 and counts["false_alarms_among_reviewed"] == 1 / 2
    assert "false alarms among reviewed parts" in requests.get(review, timeout=10).text

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


def test_a_published_version_is_committed_where_the_retrain_check_clones(
    record, settings, tmp_path
) -> None:
    """On a cluster the retrain check clones the repository: ``--git-push`` commits the new
    data.dvc and pushes it. A push the origin refuses publishes nothing: the verdicts stay
    to publish, and the next Publish (once the origin takes it) carries them."""
    import subprocess

    from fastapi.testclient import TestClient

    from components.data_version import DvcRepo
    from components.review import ReviewStore, create_app
    from fod_core.synthetic import make_synthetic_dataset

    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    make_synthetic_dataset(clone / "data", "widget", n_train=4, n_test_good=1, n_test_defect=1,
                           size=64, seed=6)  # fmt: skip
    repo = DvcRepo(clone)
    repo.ensure(settings)
    first = repo.add_and_push(clone / "data")
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "data"], check=True)
    subprocess.run([*git, "push", "-q", "origin", "HEAD"], check=True)

    def pushed_version() -> str:
        text = subprocess.run(["git", "-C", str(origin), "show", "main:data.dvc"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        return text.split("md5: ", 1)[1].split()[0]

    app = create_app(ReviewStore(record), category="widget", data_dir=clone / "data",
                     repo_root=clone, git_push=True)  # fmt: skip
    client = TestClient(app)
    queue = client.get("/api/queue").json()
    assert client.post(f"/api/decisions/{queue[0]['id']}/verdict",
                       data={"verdict": "good", "reviewer": "ana"}).status_code == 200  # fmt: skip

    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'protected branch' >&2\nexit 1\n")
    hook.chmod(0o755)
    refused = client.post("/api/publish")
    assert refused.status_code == 502 and "protected branch" in refused.json()["error"]
    assert pushed_version() == first.md5
    log = subprocess.run([*git, "log", "--format=%s"], capture_output=True, text=True).stdout
    assert log.splitlines() == ["data"]  # the refused commit was undone

    hook.unlink()
    published = client.post("/api/publish").json()
    assert published["good"] == 1 and published["commit"]
    assert pushed_version() == published["data_version"] != first.md5
    subject = subprocess.run(["git", "-C", str(origin), "log", "-1", "--format=%s", "main"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert subject.startswith("review: 1 good, 0 defective parts of widget")
