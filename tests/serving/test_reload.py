"""A server that follows the champion alias in the real MLflow registry: a new champion
is loaded in the background and swapped in while requests keep being answered."""

from __future__ import annotations

import shutil
import threading
import time

import mlflow
import pytest
import requests

from components.errors import DeploymentError
from components.local.servers import LocalServing
from components.registry import PromotionGates, register_model
from components.tracking import connect
from fod_core.predict import predict_images

METRICS = {"image_auroc": 0.95, "pixel_auroc": 0.9, "aupro": 0.8}


def register(settings, model_dir, category: str) -> str:
    connect(settings.mlflow_uri, category)
    with mlflow.start_run() as run:
        pass
    result = register_model(
        model_dir,
        run_id=run.info.run_id,
        category=category,
        metrics=METRICS,
        data_version="d1",
        code_version="test",
        gates=PromotionGates(min_image_auroc=0.0),
    )
    assert result.promoted, result.reasons
    return result.version


@pytest.mark.slow
def test_champion_moves_and_the_server_switches_without_failed_requests(
    settings, stack, model_a, model_b, test_images
):
    name = "fod-served"
    assert register(settings, model_a, "served") == "1"
    serving = LocalServing(stack.home)
    server = serving.deploy(name, "1", env=settings.env())
    image = test_images[-1].read_bytes()
    answers: list[list] = [[], []]
    stop = threading.Event()

    def client(log: list) -> None:
        while not stop.is_set():
            try:
                log.append(server.predict([image])[0])
            except Exception as error:  # a failed request is what this test looks for
                log.append({"error": repr(error)})

    threads = [threading.Thread(target=client, args=(log,)) for log in answers]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        assert register(settings, model_b, "served") == "2"
        moved = serving.deploy(name, "2", env=settings.env())  # waits for the switch
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    assert moved.pid == server.pid, "the server was restarted instead of reloading"
    for log in answers:
        assert log and all("error" not in a for a in log), [a for a in log if "error" in a]
        versions = [a["model_version"] for a in log]
        assert versions[0] == "1" and versions[-1] == "2"
        assert "1" not in versions[versions.index("2") :]  # never back to the old one
    assert requests.get(f"{server.url}/v2/models/{name}/ready", timeout=10).ok
    # The new version's answers are model B's `fod predict` scores.
    expected = predict_images(model_b, [test_images[-1]])[0]["score"]
    assert server.predict([image])[0]["score"] == pytest.approx(expected, abs=1e-5)
    serving.stop(name)


@pytest.mark.slow
def test_a_champion_that_cannot_load_leaves_the_old_one_serving(
    settings, stack, model_a, tmp_path, test_images
):
    name = "fod-unlucky"
    assert register(settings, model_a, "unlucky") == "1"
    serving = LocalServing(stack.home)
    server = serving.deploy(name, "1", env=settings.env())
    broken = tmp_path / "broken"
    shutil.copytree(model_a, broken)
    (broken / "backbone.pt").write_bytes(b"truncated")
    assert register(settings, broken, "unlucky") == "2"
    with pytest.raises(DeploymentError, match="could not load version 2"):
        serving.deploy(name, "2", env=settings.env(), timeout=60)
    status = server.status()
    assert status["version"] == "1" and "2" in status["failed_versions"]
    assert server.predict([test_images[0].read_bytes()])[0]["model_version"] == "1"
    serving.stop(name)
