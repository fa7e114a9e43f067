"""`fod pipeline run` on a stack whose services fail: before the run, in the middle of
training, at registration, and restarted mid-run; the model server while its registry is
gone. Real processes (SeaweedFS, MLflow, the KFP local runner, the model server), stopped
or killed as an outage would."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from fault_kit import FaultRow, fod_process, last_line, stop_service
from mlflow import MlflowClient

from components.data_version import DvcRepo, read_data_version
from fod_core.synthetic import make_synthetic_dataset

pytestmark = [pytest.mark.slow, pytest.mark.faults]
CATEGORY = "faulty"
EPOCHS = 60  # long enough (about 20 s here) to stop a service in the middle of it


@pytest.fixture(scope="module")
def repo(fault_stack, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-repo")
    make_synthetic_dataset(
        root / "data", CATEGORY, n_train=16, n_test_good=3, n_test_defect=3, size=64, seed=5
    )
    dvc = DvcRepo(root)
    dvc.ensure(fault_stack.settings())
    dvc.add_and_push(root / "data")
    return root


def start(stack, repo: Path, *extra: str) -> subprocess.Popen:
    """`fod pipeline run` in the background, its output piped."""
    return fod_process(
        stack, repo, "pipeline", "run", "--categories", CATEGORY,
        "--pipeline-root", str(repo / "runs" / "pipeline"),
        "--image-size", "64", "--model-size", "compact", "--lr", "0.001",
        "--val-fraction", "0.4", "--export-formats", "", "--deploy", "none",
        "--min-image-auroc", "0", *extra,
    )  # fmt: skip


def run(stack, repo: Path, *extra: str, timeout: float = 600) -> tuple[int, str, float]:
    """`fod pipeline run` to its end: (exit code, what it printed, seconds)."""
    started = time.perf_counter()
    process = start(stack, repo, *extra)
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output, time.perf_counter() - started


def raw_log(repo: Path) -> str:
    logs = sorted((repo / "runs" / "logs").glob("pipeline-*.log"))
    return logs[-1].read_text() if logs else ""


def training_runs(stack) -> list:
    client = MlflowClient(stack.settings().mlflow_uri)
    experiment = client.get_experiment_by_name(f"fod-{CATEGORY}")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'training'")


def test_s3_down_before_the_run_fails_at_the_first_step_and_names_s3(
    fault_stack, repo, fault_table
):
    version = read_data_version(repo / "data.dvc").md5
    endpoint = fault_stack.settings().s3_endpoint
    stop_service(fault_stack, "s3")
    try:
        code, output, seconds = run(fault_stack, repo, "--epochs", "1")
    finally:
        fault_stack.up()
    message = last_line(output)
    assert code != 0
    assert f"S3 at {endpoint} is unreachable" in message and "`fod stack up`" in message
    assert "fetch-data" in message and seconds < 90, (seconds, output[-2000:])
    assert read_data_version(repo / "data.dvc").md5 == version
    fault_table(
        FaultRow("S3 (SeaweedFS) stopped", "before the run: fetch-data", seconds, message,
                 "data version (data.dvc, the remote's objects); nothing started")
    )  # fmt: skip


def _wait_for_epoch(repo: Path, process, epoch: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while f"epoch {epoch}/" not in raw_log(repo):
        assert process.poll() is None, "the run ended before training got that far"
        assert time.monotonic() < deadline, "training never got that far"
        time.sleep(0.2)


def test_s3_killed_mid_training_keeps_the_model_and_the_rerun_does_not_train_again(
    fault_stack, repo, fault_table
):
    before = len(training_runs(fault_stack))
    process = start(fault_stack, repo, "--epochs", str(EPOCHS))
    try:
        _wait_for_epoch(repo, process, 5)
        stop_service(fault_stack, "s3", kill=True)
        killed = time.perf_counter()
        output, _ = process.communicate(timeout=600)
        seconds = time.perf_counter() - killed
    finally:
        if process.poll() is None:
            process.kill()
        fault_stack.up()
    message = last_line(output)
    assert process.returncode != 0
    assert "train-fod" in message and "MLflow's artifact store is down" in message, output[-3000:]
    assert "`fod stack up`" in message and seconds < 240, seconds
    log = raw_log(repo)
    assert f"epoch {EPOCHS}/{EPOCHS}" in log  # the epochs ran to the end before the upload
    kept = list((fault_stack.home / "kept-models").glob("*/model/kept.json"))
    assert len(kept) == 1, "the trained model is kept"
    fault_table(
        FaultRow("S3 (SeaweedFS) killed", "mid-training: train-fod, epoch 5", seconds,
                 message, "the trained model (kept-models/), the data, the feature cache")
    )  # fmt: skip

    code, output, seconds = run(fault_stack, repo, "--epochs", str(EPOCHS))
    assert code == 0, output[-3000:]
    assert "reused the model trained before a failed upload" in output
    assert "not trained again" in output
    assert "epoch 1/" not in raw_log(repo)  # no epoch ran in the rerun
    runs = training_runs(fault_stack)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == before + 1
    assert finished[0].data.tags["kept_model"].endswith("reused: an upload failed")
    assert finished[0].data.metrics["reused_kept_model"] == 1.0
    assert not list((fault_stack.home / "kept-models").glob("*/model"))  # tracked: let go
    client = MlflowClient(fault_stack.settings().mlflow_uri)
    assert client.get_model_version_by_alias(f"fod-{CATEGORY}", "champion")
    fault_table(
        FaultRow("(the rerun after `fod stack up`)", "train-fod", None,
                 "train-fod: reused the model trained before a failed upload (kept ...): "
                 "not trained again", f"registered and promoted; training took 0 epochs, "
                 f"the whole rerun {seconds:.0f} s")
    )  # fmt: skip
