"""A product with good images only, through the KFP local pipeline against the real stack,
with the pipeline's defaults (the recipe chosen without labels, an auto validation
fraction, a budget of epochs): a champion is registered on the evidence that needs no
labelled defect and served; a clearly worse model is kept from champion by the
planted-anomaly gate."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

from components.data_version import DvcRepo, remote_url
from components.local.servers import LocalServing
from components.tracking import download_fod_model
from fod_core.artifact import read_manifest
from fod_core.synthetic import make_good_only_folder
from pipelines.runner import run_local

CATEGORY = "plainpart"  # its own registered model: other tests share the MLflow server


@pytest.fixture(scope="module")
def good_only_data(settings, tmp_path_factory):
    repo_root = tmp_path_factory.mktemp("good-only-repo")
    data = make_good_only_folder(repo_root / "data", CATEGORY, n_good=50, size=128, seed=3)
    repo = DvcRepo(repo_root)
    repo.ensure(settings, remote_url(settings, "dvc-good-only"))
    return data, repo.add_and_push(data)


def _arguments(settings, version, **overrides) -> dict:
    return {
        "dvc_remote": remote_url(settings, "dvc-good-only"),
        "data_version": version.md5,
        "categories": [CATEGORY],
        "data_format": "folder",
        "code_version": "test-code",
        "image_size": 128,
        "model_size": "compact",
        "batch_size": 8,
        "cache_prefix": "features-good-only-test",
        "deploy_target": "local",
    } | overrides


@pytest.mark.slow
def test_good_only_product_gets_a_served_champion_and_keeps_it(
    settings, stack, good_only_data, tmp_path, capfd
):
    data, version = good_only_data
    client = MlflowClient(settings.mlflow_uri)
    name = f"fod-{CATEGORY}"

    run_local(_arguments(settings, version), tmp_path / "first")
    champion = client.get_model_version_by_alias(name, "champion")
    tags = champion.tags
    assert tags["gates"] == "passed"
    assert tags["evidence"].startswith(
        "no labelled defects: 24 anomalies planted into 12 held-out normals (seed 0)"
    )
    # the auto validation fraction (a third, at most): the training-conditional promise of
    # 11 calibration normals, 1 - 0.1 ** (1 / 11)
    assert "false alarms" in tags["evidence"] and "promised at most 0.1889" in tags["evidence"]
    assert (
        "at most 19% false alarms, with 90% confidence, from 11 good parts (threshold at the "
        "1st highest of their scores); 1% was asked: 230 calibration normals are needed"
    ) in tags["threshold"]
    assert json.loads(tags["splits"]) == {
        "train": 23,
        "validation": 15,
        "validation_choice": 4,
        "validation_calibration": 11,
        "test_normal": 12,
        "test_anomalous": 0,
        "test_masks": 0,
    }
    metrics = json.loads(tags["metrics"])
    assert metrics["image_auroc"] is None and metrics["evidence"] == "planted"
    assert metrics["planted_image_auroc"] is not None and metrics["planted_aupro"] is not None
    run = client.get_run(champion.run_id)
    assert run.data.metrics["split_validation"] == 15 and run.data.tags["evidence"] == "planted"
    # what the recipe chose, with its label-free evidence, travels with the run and model
    mlflow.set_tracking_uri(settings.mlflow_uri)
    registered = download_fod_model(f"models:/{name}/{champion.version}", tmp_path / "champion")
    manifest = read_manifest(registered)
    assert manifest["recipe"]["auto"]["candidates"] and manifest["training"]["config"]["epochs"]
    assert "recipe.auto" in run.data.tags
    # The deploy step serves the champion on loopback.
    server = LocalServing(stack.home).get(name)
    image = sorted((data / CATEGORY / "good").glob("*.png"))[0].read_bytes()
    assert server.predict([image])[0]["model_version"] == champion.version
    assert '"evidence": "no labelled defects' in "".join(capfd.readouterr())  # step output

    # The method barely trained: its maps miss the planted regions, so the planted gate keeps
    # the champion (a recipe chosen again would score with the training-free retrieval).
    worse = {"auto_recipe": False, "level_weights": "equal", "epochs": 1, "learning_rate": 1e-7}
    run_local(_arguments(settings, version, **worse), tmp_path / "second")
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert int(challenger.version) == int(champion.version) + 1
    assert client.get_model_version_by_alias(name, "champion").version == champion.version
    assert "planted_aupro" in challenger.tags["gates"]
    assert "worse than the champion" in challenger.tags["gates"]
    assert challenger.tags["evidence"].startswith("no labelled defects")
    assert server.predict([image])[0]["model_version"] == champion.version
