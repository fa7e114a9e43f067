"""An interrupted `fod retrain` on the real stack: the next check resumes it and reuses
the steps that completed (its own file, so that a parallel test run can place it apart
from the other retrain tests)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from fod_core.synthetic import make_synthetic_dataset
from pipelines.retrain import retrain_once


@pytest.mark.slow
def test_an_interrupted_retrain_is_resumed_and_reuses_the_completed_steps(stack, tmp_path_factory):
    import os
    import signal
    import subprocess
    import sys
    import time

    category = "resumed"
    repo = tmp_path_factory.mktemp("resume-repo")
    make_synthetic_dataset(
        repo / "data", category, n_train=16, n_test_good=3, n_test_defect=3, size=64, seed=11
    )
    runs = repo / "runs"
    cli = [
        "--categories", category, "--track", "data", "--pipeline-root", str(runs),
        "--image-size", "64", "--model-size", "compact", "--epochs", "10", "--lr", "0.001",
        "--min-image-auroc", "0", "--val-fraction", "0.4",  # 5 of 16 for validation
    ]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "-q", "retrain", *cli],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:  # interrupt it once training has completed and the next step has started
        while not list(runs.glob("fod-training-*/*/calibrate-threshold")):
            assert first.poll() is None and time.monotonic() < deadline, "no training seen"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    client = MlflowClient()
    assert not client.search_model_versions(f"name='fod-{category}'")  # it did not finish

    report = retrain_once(
        [category],
        repo_root=repo,
        track="data",
        pipeline_root=runs,
        arguments={
            "image_size": 64,
            "model_size": "compact",
            "epochs": 10,
            "learning_rate": 0.001,
            "min_image_auroc": 0.0,
            "val_fraction": "0.4",  # 5 of 16 normals: the minimum the validation step asks
        },
        home=stack.home,
    )
    assert "interrupted retrain" in report["decisions"][0]["reason"]
    assert report["results"][category]["new_version"] == "1"
    experiment = client.get_experiment_by_name(f"fod-{category}")
    training_runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.stage = 'training'"
    )
    assert len(training_runs) == 1  # the second run took training from the KFP cache
