"""The predictor's version handling without a server: swap, failure, retry."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from components.errors import ServingError
from components.serving.kserve_model import build_kserve_model
from components.serving.predictor import FODPredictor
from components.serving.scorer import BatchScorer
from components.serving.source import ModelSource
from fod_core.artifact import ArtifactError


def test_a_failed_version_keeps_the_old_model_and_is_retried_later(model_a, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(model_a, model_dir)
    predictor = FODPredictor(ModelSource(str(model_dir)), retry_failed_after=0.5)
    first = predictor.load_current()
    assert not predictor.check_for_update()  # same version: nothing to do

    manifest = json.loads((model_dir / "fod.json").read_text())
    (model_dir / "fod.json").write_text(json.dumps(manifest | {"created_at": "v2"}))
    backbone = (model_dir / "backbone.pt").read_bytes()
    (model_dir / "backbone.pt").write_bytes(b"broken")
    with pytest.raises(ArtifactError, match=r"backbone\.pt is corrupt"):
        predictor.check_for_update()
    assert predictor.active is first
    assert "v2" in predictor.status()["failed_versions"]
    assert not predictor.check_for_update()  # not retried at once

    (model_dir / "backbone.pt").write_bytes(backbone)
    time.sleep(0.6)
    assert predictor.check_for_update()
    assert predictor.active.version == "v2" and predictor.status()["failed_versions"] == {}


def test_model_uris_are_checked():
    assert ModelSource("models:/fod-x@champion").follows_alias
    assert not ModelSource("models:/fod-x/3").follows_alias
    with pytest.raises(ServingError, match="models:/NAME@ALIAS"):
        ModelSource("models:/fod-x@").current_version()


def test_loading_runs_on_the_scoring_thread_and_errors_reach_the_caller(model_a, tmp_path):
    """All PyTorch work shares one thread: a second one would get OpenMP workers of its
    own and slow every op (fod_core.runtime)."""
    scorer = BatchScorer()
    try:
        assert scorer.call(lambda: threading.current_thread().name) == "fod-score"
        with pytest.raises(ZeroDivisionError):
            scorer.call(lambda: 1 / 0)
        assert scorer.call(lambda: 2) == 2  # the thread survives a failed job
        assert scorer.call(lambda: scorer.call(lambda: 3)) == 3  # nested: runs inline

        loaded_on = []

        def recording_runner(work):
            def recorded():
                loaded_on.append(threading.current_thread().name)
                return work()

            return scorer.call(recorded)

        predictor = FODPredictor(ModelSource(str(model_a)))
        predictor.run_torch = recording_runner
        loaded = predictor.load_current()
        assert loaded_on == ["fod-score"] and loaded.detector.post.image_size > 0
    finally:
        scorer.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        scorer.call(lambda: 0)


def test_closing_fails_a_queued_job_instead_of_leaving_it_waiting():
    scorer = BatchScorer()
    release, started = threading.Event(), threading.Event()
    blocker = threading.Thread(
        target=scorer.call, args=(lambda: (started.set(), release.wait(5)),), daemon=True
    )
    blocker.start()
    assert started.wait(5)  # the scoring thread is busy with the first job
    outcome = []

    def queued():
        try:
            outcome.append(scorer.call(lambda: "ran"))
        except RuntimeError as error:
            outcome.append(str(error))

    waiter = threading.Thread(target=queued, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 5
    while not scorer._jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    scorer.close()
    release.set()
    waiter.join(5)
    blocker.join(5)
    assert outcome == ["the model server is shutting down"]


def test_the_kserve_model_loads_through_its_scoring_thread(model_a):
    predictor = FODPredictor(ModelSource(str(model_a)))
    model = build_kserve_model("fod-test", predictor)
    try:
        assert predictor.run_torch == model._scorer.call
        assert model.load() and predictor.active is not None
    finally:
        model.stop()
