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
        FaultRow("S3 (SeaweedFS) killed", "mid-training: train-fod at epoch 5 of 60 (the "
                 "other 55 run before the upload fails)", seconds, message,
                 "the trained model (kept-models/), the data, the feature cache")
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


@pytest.fixture(scope="module")
def champion(fault_stack, repo) -> str:
    """The product's champion version (the run of the test above, from the KFP cache when
    it ran; trained here when it did not)."""
    code, output, _ = run(fault_stack, repo, "--epochs", str(EPOCHS))
    assert code == 0, output[-3000:]
    client = MlflowClient(fault_stack.settings().mlflow_uri)
    return client.get_model_version_by_alias(f"fod-{CATEGORY}", "champion").version


def test_mlflow_down_at_registration_fails_that_step_and_leaves_the_registry(
    fault_stack, repo, champion, fault_table
):
    client = MlflowClient(fault_stack.settings().mlflow_uri)
    versions = len(client.search_model_versions(f"name='fod-{CATEGORY}'"))
    uri = fault_stack.settings().mlflow_uri
    stop_service(fault_stack, "mlflow")
    try:  # a new promotion tolerance: every step before registration comes from the cache
        code, output, seconds = run(
            fault_stack, repo, "--epochs", str(EPOCHS), "--promotion-tolerance", "0.02"
        )
    finally:
        fault_stack.up()
    message = last_line(output)
    assert code != 0 and "register-model" in message, output[-3000:]
    assert f"MLflow at {uri} does not answer (connection refused)" in message
    assert "`fod stack up`" in message and seconds < 120, seconds
    assert client.get_model_version_by_alias(f"fod-{CATEGORY}", "champion").version == champion
    assert len(client.search_model_versions(f"name='fod-{CATEGORY}'")) == versions
    fault_table(
        FaultRow("MLflow stopped", "register-model (the steps before it cached)", seconds,
                 message, f"champion v{champion} and its alias; the evaluated model (KFP cache)")
    )  # fmt: skip


def test_seaweedfs_restarted_with_its_data_mid_training_the_run_completes(
    fault_stack, repo, fault_table
):
    process = start(fault_stack, repo, "--epochs", str(EPOCHS + 1))  # trains anew
    try:
        _wait_for_epoch(repo, process, 5)
        stop_service(fault_stack, "s3")
        down = time.perf_counter()
        fault_stack.up()  # the same port and data folder
        outage = time.perf_counter() - down
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "reused the model" not in output
    fault_table(
        FaultRow("S3 (SeaweedFS) restarted, same data", "mid-training: train-fod", None,
                 f"none: the run completed (S3 was down {outage:.0f} s)", "everything")
    )  # fmt: skip


def test_the_model_server_keeps_serving_while_its_registry_is_down(
    fault_stack, repo, champion, fault_table
):
    from components.local.servers import LocalServing

    code, output, _ = _cli(fault_stack, repo, "deploy", "local", "--category", CATEGORY)
    assert code == 0, output
    server = next(s for s in LocalServing(fault_stack.home).servers() if CATEGORY in s.name)
    image = next((repo / "data" / CATEGORY / "test" / "good").iterdir()).read_bytes()
    before = server.predict([image])[0]
    uri = fault_stack.settings().mlflow_uri
    stopped = time.perf_counter()
    stop_service(fault_stack, "mlflow")
    try:
        deadline = time.monotonic() + 60
        while (server.status() or {}).get("last_check", {}).get("ok") is not False:
            assert time.monotonic() < deadline, server.status()
            time.sleep(0.5)
        seconds = time.perf_counter() - stopped
        status = server.status()
        during = server.predict([image])[0]
    finally:
        fault_stack.up()
    assert during["score"] == pytest.approx(before["score"], abs=1e-6)
    assert status["version"] == champion and status["ready"]
    assert f"the registry, MLflow at {uri}, does not answer" in status["last_check"]["error"]
    deadline = time.monotonic() + 60
    while not (server.status() or {}).get("last_check", {}).get("ok"):
        assert time.monotonic() < deadline, server.status()
        time.sleep(0.5)
    log = Path(server.log).read_text()
    assert "still serving version" in log and "answers again" in log
    LocalServing(fault_stack.home).stop(server.name)
    fault_table(
        FaultRow("MLflow (the registry) stopped", "the model server's alias poll", seconds,
                 f"a warning in its log and /status last_check: {status['last_check']['error']}",
                 f"v{champion} served throughout, same scores; polls resume when MLflow is back")
    )  # fmt: skip


def _cli(stack, repo: Path, *args: str) -> tuple[int, str, float]:
    started = time.perf_counter()
    process = fod_process(stack, repo, *args)
    output, _ = process.communicate(timeout=300)
    return process.returncode, output, time.perf_counter() - started
