"""Tiny trained models and real model-server processes on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from serving_kit import png, start_server

from components.data_version import DvcRepo
from components.local.processes import free_port, stop_server
from components.review import ReviewStore, create_app
from components.serving.records import DecisionLog, KeepImages, RecordSettings, Served
from fod_core.artifact import load_detector
from fod_core.cache import LocalStore
from fod_core.config import LevelConfig, ModelConfig, TrainConfig
from fod_core.synthetic import make_synthetic_dataset
from fod_core.train import train_model

TINY = ModelConfig(
    image_size=64,
    levels=(
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
    ),
)


@pytest.fixture(scope="session")
def served_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("served-data"),
        "widget",
        n_train=16,
        n_test_good=3,
        n_test_defect=3,
        size=64,
        seed=3,
    )


def _train(root: Path, out: Path, epochs: int) -> Path:
    train_model(
        root,
        "widget",
        out,
        model_config=TINY,
        train_config=TrainConfig(epochs=epochs, batch_size=8, lr=1e-3, val_fraction=0.25),
        cache_store=LocalStore(out.parent / "cache"),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def model_a(served_data, tmp_path_factory) -> Path:
    return _train(served_data, tmp_path_factory.mktemp("model-a") / "model", epochs=2)


@pytest.fixture(scope="session")
def model_b(served_data, tmp_path_factory) -> Path:
    return _train(served_data, tmp_path_factory.mktemp("model-b") / "model", epochs=4)


@pytest.fixture(scope="session")
def test_images(served_data) -> list[Path]:
    """One good and the defect images of the generated test split."""
    return sorted((served_data / "widget" / "test").glob("*/*.png"))[:4]


@pytest.fixture(scope="module")
def server(model_a, tmp_path_factory):
    """Model A served from its directory, with small limits to test them cheaply."""
    home = tmp_path_factory.mktemp("serve-home")
    running = start_server(
        home,
        str(model_a),
        "fod-widget",
        "--model-version",
        "7",
        "--poll-interval",
        "0",
        "--max-request-mb",
        "1",
        "--max-images",
        "4",
        "--max-image-pixels",
        "1000000",
        "--max-batch",
        "8",
    )
    yield running
    stop_server(running)


# -- the review page (tests/serving/test_review*.py) ----------------------------------
@pytest.fixture
def review_repo(settings, tmp_path):
    """A data repository tracked by DVC, like a user's."""
    root = tmp_path / "repo"
    make_synthetic_dataset(root / "data", "widget", n_train=6, n_test_good=2, n_test_defect=2,
                           size=64, seed=5)  # fmt: skip
    repo = DvcRepo(root)
    repo.ensure(settings)
    repo.add_and_push(root / "data")
    return root


@pytest.fixture
def record(model_a, served_data, tmp_path):
    """Decisions of model A on the test images; three are flagged whatever the model says."""
    detector = load_detector(model_a)
    paths = sorted((served_data / "widget" / "test").glob("*/*.png"))[:4]
    images = [Image.open(p).convert("RGB") for p in paths]
    predictions = detector.predict(images)
    path = tmp_path / "record.sqlite"
    log = DecisionLog(RecordSettings(path, KeepImages.FLAGGED))
    log.submit(
        [
            Served(png(image), p.score, detector.post.threshold, index < 3 or p.is_anomalous,
                   p.anomaly_map, "fod-widget", "3", "abc")
            for index, (image, p) in enumerate(zip(images, predictions, strict=True))
        ]
    )  # fmt: skip
    log.close()
    assert log.counts["recorded"] == 4
    return path


@pytest.fixture
def review(record, review_repo):
    """``fod review``'s application, served by uvicorn on a free loopback port."""
    import uvicorn

    app = create_app(
        ReviewStore(record), category="widget", data_dir=review_repo / "data",
        repo_root=review_repo,
    )  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)
