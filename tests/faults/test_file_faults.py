"""Files that break under a run: a full disk (a small tmpfs) under the feature cache and
the decision record, a truncated feature-cache entry, model file and kept model. Each gives
a clear error and is rebuilt or refused, never used; nothing else is lost."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_kit import FaultRow

from fod_core.cache import FeatureCache, LocalStore
from fod_core.config import LevelConfig, ModelConfig, TrainConfig
from fod_core.data import load_category
from fod_core.synthetic import make_synthetic_dataset
from fod_core.train import train_model

pytestmark = pytest.mark.faults
TINY = ModelConfig(
    image_size=64,
    levels=(LevelConfig(d_model=32, n_heads=4, n_layers=1),) * 2,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("fault-data"), "widget", n_train=12, n_test_good=2,
        n_test_defect=2, size=64, seed=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-model") / "model"
    train_model(
        data, "widget", out, model_config=TINY,
        train_config=TrainConfig(epochs=2, batch_size=8, lr=1e-3, val_fraction=0.25),
        cache_store=LocalStore(out.parent / "cache"), progress=False,
    )  # fmt: skip
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a disk that fills after a few writes (root only, as in CI)."""
    import os

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a small tmpfs needs root (`mount -t tmpfs`); CI runs as root")
    where = tmp_path / "small-disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill the small disk to about ``leave`` free bytes, as other files on a disk would."""
    import os

    fd = os.open(disk / "other-files", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
    finally:
        os.close(fd)


def _cache(store) -> FeatureCache:
    return FeatureCache.for_backbone(store, TINY.backbone, TINY.image_size)


def test_a_truncated_feature_cache_entry_is_extracted_again(data, tmp_path, caplog, fault_table):
    records = load_category(data, "widget").train[:3]
    store = LocalStore(tmp_path / "cache")
    first, _ = _cache(store).features(records, progress=False)
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a torn write, a bad copy
    cache = _cache(store)
    started = time.perf_counter()
    again, stats = cache.features(records, progress=False)
    seconds = time.perf_counter() - started
    assert (stats.hits, stats.misses, cache.damaged) == (2, 1, 1)
    for level_first, level_again in zip(first, again, strict=True):
        # the same features, rebuilt (one float16 step apart: extracted in another batch)
        assert torch.allclose(level_first, level_again, rtol=1e-3, atol=1e-2)
    message = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert _cache(store).features(records, progress=False)[1].hits == 3  # overwritten whole
    fault_table(
        FaultRow("feature cache entry truncated", "any step reading the cache", seconds,
                 message, "the other entries; the entry is extracted again and overwritten")
    )  # fmt: skip


def test_a_full_disk_under_the_feature_cache_costs_the_cache_not_the_run(
    data, small_disk, caplog, fault_table
):
    records = load_category(data, "widget").train
    (small_disk / "cache").mkdir()
    fill(small_disk, leave=32 * 1024)
    cache = _cache(LocalStore(small_disk / "cache"))
    started = time.perf_counter()
    features, _ = cache.features(records, progress=False)
    seconds = time.perf_counter() - started
    assert cache.unwritable > 0 and features[0].shape[0] == len(records)
    assert not list(small_disk.rglob(".tmp-*"))  # no torn file left behind
    message = next(r.getMessage() for r in caplog.records if "cannot write" in r.getMessage())
    assert "No space left on device" in message
    fault_table(
        FaultRow("disk full (small tmpfs)", "the feature cache (fod train, cache step)",
                 seconds, message, f"the run: all {len(records)} images' features used; "
                 f"{cache.unwritable} entries not cached, no partial file")
    )  # fmt: skip


def test_a_truncated_model_file_is_refused_with_its_name(model, tmp_path, data, fault_table):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    image = next((data / "widget" / "test" / "good").iterdir())
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "fod_core.cli", "predict", "--model", str(broken), str(image)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{weights} is corrupt" in message
    fault_table(
        FaultRow("model file truncated (model.pt)", "fod predict / evaluate / serve", seconds,
                 message, "the model is refused, never used (a served one stays: test_reload)")
    )  # fmt: skip


def test_a_truncated_kept_model_is_removed_and_trained_again(model, tmp_path, caplog, fault_table):
    from components.kept import KeptModels

    kept = KeptModels(tmp_path / "kept")
    kept.keep("key", model)
    weights = kept.folder("key") / "model" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert kept.restore("key", tmp_path / "restored") is None
    assert not kept.folder("key").exists() and not (tmp_path / "restored").exists()
    message = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert "model.pt does not match its SHA-256" in message
    fault_table(
        FaultRow("kept model truncated", "train-fod, on a rerun", None, message,
                 "nothing damaged is used: the step trains again")
    )  # fmt: skip


def test_a_full_disk_under_the_decision_record_never_fails_a_request(
    model, data, small_disk, fault_table
):
    from components.local.processes import ServerState, free_port, stop_server, wait_healthy
    from components.local.servers import spawn_model_server

    server = spawn_model_server(
        small_disk.parent, "fod-widget", str(model), http_port=free_port(),
        grpc_port=free_port(), extra=("--record", str(small_disk / "record.db")),
    )  # fmt: skip
    process = ServerState(pid=server.pid, log=server.log)
    try:
        wait_healthy("fod-widget", process, lambda: bool(server.status()), timeout=120)
        fill(small_disk, leave=300 * 1024)
        images = [p.read_bytes() for p in sorted((data / "widget" / "test").glob("*/*.png"))]
        answered, started, failed_at = 0, time.perf_counter(), None
        for _ in range(60):  # a couple of hundred KiB of decisions and images
            answered += len(server.predict(images))
            records = server.status()["records"]
            if records["failed"] and failed_at is None:
                failed_at = time.perf_counter() - started
                break
        recorded = records["recorded"]
        assert failed_at is not None, records
        more = server.predict(images)  # still answering after the disk is full
    finally:
        stop_server(process)
    assert len(more) == len(images) and recorded > 0
    log = Path(server.log).read_text()
    line = next(x for x in log.splitlines() if "could not record a decision" in x)
    message = line.split(": ", 1)[-1]
    assert "full" in message
    fault_table(
        FaultRow("disk full (small tmpfs)", "the model server's decision record",
                 failed_at, message, f"every request answered ({answered + len(images)}); "
                 f"{recorded} decisions recorded before it filled, readable; failed counted "
                 "in /status and /metrics")
    )  # fmt: skip
