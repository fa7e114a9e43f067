"""`fod retrain` on the real stack: new good images -> a new version that is served when the
gates pass; no new data -> nothing runs; a worse model -> the champion stays; one at a time."""

from __future__ import annotations

import shutil

import pytest
from mlflow import MlflowClient

from components.data_version import DataVersionError
from components.local.servers import LocalServing
from fod_core.synthetic import make_synthetic_dataset
from pipelines.retrain import RetrainLock, parse_duration, retrain_every, retrain_once

CATEGORY = "fresh"
NAME = f"fod-{CATEGORY}"
FAST = {
    "image_size": 64,
    "model_size": "compact",
    "epochs": 30,  # a model that reliably passes real gates (image AUROC 1.0 on this data)
    "batch_size": 8,
    "learning_rate": 1e-3,
    "val_fraction": "0.3",  # 11 of 30 normals (3 to choose on, 8 to calibrate on)
    "cache_prefix": "features-retrain-test",
    # real gates: 8 good and 12 defective test images (96 pairs, AUROC's standard error
    # about 0.05 here): "not worse" allows twice that, the minimum refuses a poor model
    "min_image_auroc": 0.75,
    "promotion_tolerance": 0.1,
    "export_formats": "",  # exports are tested in test_pipeline; not needed here
}


def add_good_images(repo, count: int, seed: int) -> None:
    extra = make_synthetic_dataset(
        repo / "extra" / str(seed), CATEGORY, n_train=count, n_test_good=1, n_test_defect=1,
        size=64, seed=seed,
    )  # fmt: skip
    target = repo / "data" / CATEGORY / "train" / "good"
    for image in sorted((extra / CATEGORY / "train" / "good").glob("*.png")):
        shutil.copy(image, target / f"new_{seed}_{image.name}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrain-repo")
    make_synthetic_dataset(
        root / "data", CATEGORY, n_train=30, n_test_good=8, n_test_defect=6, size=64, seed=7
    )
    return root


def cached_objects(settings) -> int:
    pages = settings.s3_client().get_paginator("list_objects_v2")
    prefix = f"{FAST['cache_prefix']}/"
    return sum(
        page.get("KeyCount", 0) for page in pages.paginate(Bucket=settings.bucket, Prefix=prefix)
    )


def served_version(stack, repo) -> str:
    server = LocalServing(stack.home).get(NAME)
    image = next((repo / "data" / CATEGORY / "test").glob("*/000.png")).read_bytes()
    return server.predict([image])[0]["model_version"]


def check(stack, repo, tmp_path, **overrides) -> dict:
    return retrain_once(
        [CATEGORY],
        repo_root=repo,
        track="data",
        pipeline_root=tmp_path / "runs",
        arguments=FAST | overrides,
        home=stack.home,
    )


@pytest.mark.slow
def test_retrain_on_new_good_images_then_nothing_then_a_worse_model(
    stack, settings, repo, tmp_path
):
    client = MlflowClient()
    first = check(stack, repo, tmp_path)
    assert first["trained"] == [CATEGORY]
    assert "no champion" in first["decisions"][0]["reason"]
    assert first["results"][CATEGORY]["promoted"]
    assert served_version(stack, repo) == "1"

    # No new data: nothing runs, and the report says why.
    again = check(stack, repo, tmp_path)
    assert again["trained"] == [] and "trained on data" in again["decisions"][0]["reason"]
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1

    # New good images: a new version, trained on them; the cache extracts only those.
    before = cached_objects(settings)
    assert before and before % 30 == 0  # the same number of objects per training image
    add_good_images(repo, 4, seed=8)
    grown = check(stack, repo, tmp_path, warm_start=True)
    assert grown["data_version"] != first["data_version"]
    result = grown["results"][CATEGORY]
    assert result == {**result, "new_version": "2", "promoted": True, "champion_version": "2"}
    run = client.get_run(client.get_model_version(NAME, "2").run_id)
    assert run.data.metrics["cache_misses"] == 0  # training read every feature from the cache
    after = cached_objects(settings)
    assert after - before == 4 * (before // 30)  # the cache step extracted the 4 new images only
    assert run.data.tags["warm_start_from"] == f"models:/{NAME}@champion"
    assert served_version(stack, repo) == "2"  # the running server switched by itself

    # A worse model on the next data (the method barely trained: a recipe chosen again would
    # score with the training-free retrieval): registered, not promoted; the served one stays.
    add_good_images(repo, 2, seed=9)
    method = {"auto_recipe": False, "level_weights": "equal"}
    worse = check(
        stack, repo, tmp_path, **method, epochs=1, learning_rate=1e-7, promotion_tolerance=0.0
    )
    assert worse["results"][CATEGORY]["new_version"] == "3"
    assert not worse["results"][CATEGORY]["promoted"]
    gates = client.get_model_version(NAME, "3").tags["gates"]
    assert "below the minimum" in gates or "worse than the champion" in gates, gates
    assert client.get_model_version_by_alias(NAME, "champion").version == "2"
    assert served_version(stack, repo) == "2"


def test_a_second_check_while_one_runs_exits_with_a_clear_message(stack, repo, capsys):
    from pipelines.cli import main

    with RetrainLock(stack.home):
        code = main(["retrain", "--categories", CATEGORY, "--dvc-file", str(repo / "none.dvc")])
    assert code == 2
    assert "another retrain is running (pid" in capsys.readouterr().err


def test_submitting_to_an_unreachable_kfp_is_a_clear_error(stack, tracked_repo, capsys):
    from components.local.processes import free_port
    from pipelines.cli import main

    dvc_file = tracked_repo / "data.dvc"
    assert dvc_file.is_file()  # set up above, whatever ran before
    code = main(
        ["retrain", "--categories", "remote", "--dvc-file", str(dvc_file),
         "--kfp-host", f"http://127.0.0.1:{free_port()}"]
    )  # fmt: skip
    assert code == 2
    assert "is unreachable" in capsys.readouterr().err
    # the claim taken to submit is closed: the next check is not kept out by it
    from components.data_version import read_data_version
    from pipelines.retrain import RetrainClaims

    claims = RetrainClaims()
    version = read_data_version(dvc_file).md5
    assert claims.active(version) == []
    closed = claims.client.search_runs(
        [claims.experiment_id], filter_string=f"tags.data_version = '{version}'"
    )
    assert [run.info.status for run in closed] == ["FAILED"]


def test_claims_keep_one_submitter_per_data_version_and_let_a_new_pod_resume(stack):
    """The CronJob's state is an emptyDir, and a KFP recurring run may check too: which
    check trains which data version is in MLflow. A second check does not submit again; a
    new pod finds the KFP run of a holder that died and waits for it."""
    from pipelines.retrain import RetrainClaims

    claims = RetrainClaims()
    data = "claimed-version.dir"
    mine, theirs = claims.acquire(data, ["widget"], "cronjob-pod-1")
    assert mine is not None and theirs is None
    second, theirs = claims.acquire(data, ["widget"], "recurring-run-pod")
    assert second is None and theirs.run_id == mine.run_id and not theirs.kfp_run_id
    claims.record(mine, "kfp-run-7")
    _, theirs = RetrainClaims().acquire(data, ["widget"], "cronjob-pod-2")  # pod 1 died
    assert (theirs.kfp_run_id, theirs.holder) == ("kfp-run-7", "cronjob-pod-1")
    claims.release(mine)
    fresh, theirs = claims.acquire(data, ["widget"], "cronjob-pod-3")
    assert fresh is not None and theirs is None
    claims.release(fresh)


def test_of_two_claims_written_at_once_the_older_wins(stack):
    from pipelines.retrain import RetrainClaims

    claims = RetrainClaims()
    data = "raced-version.dir"
    first = claims.create(data, ["widget"], "cronjob")
    second = claims.create(data, ["widget"], "recurring-run")
    assert [c.run_id for c in claims.active(data)] == [first.run_id, second.run_id]
    _, theirs = claims.acquire(data, ["widget"], "a-third-check")
    assert theirs.run_id == first.run_id
    for claim in (first, second):
        claims.release(claim)


def test_a_stale_claim_is_closed(stack, monkeypatch):
    from pipelines import retrain

    claims = retrain.RetrainClaims()
    stale = claims.create("stale-version.dir", ["widget"], "a-pod-long-gone")
    monkeypatch.setattr(retrain, "CLAIM_STALE_SECONDS", 0.0)
    assert claims.active("stale-version.dir") == []
    assert claims.client.get_run(stale.run_id).info.status == "KILLED"


@pytest.mark.slow
def test_the_schedule_survives_a_failed_check(stack, repo, tmp_path):
    attempts = []

    def flaky_check() -> dict:
        attempts.append(len(attempts))
        dvc_file = "missing.dvc" if len(attempts) == 1 else "data.dvc"
        return retrain_once(
            [CATEGORY], repo_root=repo, dvc_file=dvc_file, track="data", pipeline_root=tmp_path,
            arguments=FAST, home=stack.home,
        )  # fmt: skip

    with pytest.raises(DataVersionError):
        retrain_once([CATEGORY], repo_root=repo, dvc_file="missing.dvc", home=stack.home)
    outcomes = retrain_every(0.01, flaky_check, max_checks=2)
    assert "DataVersionError" in outcomes[0]["error"]
    assert "decisions" in outcomes[1]


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900
    assert parse_duration("1h") == 3600 and parse_duration("2") == 2
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")


def test_a_champion_that_was_never_deployed_is_run_again(stack, settings, tmp_path):
    import mlflow

    from components.registry import PromotionGates, register_model
    from components.tracking import connect
    from fod_core.cache import LocalStore
    from fod_core.config import LevelConfig, ModelConfig, TrainConfig
    from fod_core.train import train_model
    from pipelines.retrain import decide

    # A champion on data "d-undeployed" whose pipeline run stopped before deploy_model.
    root = make_synthetic_dataset(
        tmp_path, "undeployed", n_train=8, n_test_good=1, n_test_defect=1, size=64, seed=2
    )
    tiny = ModelConfig(image_size=64, levels=(LevelConfig(d_model=16, n_heads=4, n_layers=1),) * 2)
    train_model(
        root, "undeployed", tmp_path / "model", model_config=tiny,
        train_config=TrainConfig(epochs=1, batch_size=4, val_fraction=0.25),
        cache_store=LocalStore(tmp_path / "cache"), progress=False,
    )  # fmt: skip
    connect(settings.mlflow_uri, "undeployed")
    with mlflow.start_run() as run:
        pass
    register_model(
        tmp_path / "model", run_id=run.info.run_id, category="undeployed",
        metrics={"image_auroc": 1.0}, data_version="d-undeployed", code_version="t",
        gates=PromotionGates(min_image_auroc=0.0),
    )  # fmt: skip
    decision = decide("undeployed", "d-undeployed")
    assert decision.retrain and "never deployed" in decision.reason
    # a rerun whose steps were all cached reaches registration with the same training run:
    # no second version of the same model
    again = register_model(
        tmp_path / "model", run_id=run.info.run_id, category="undeployed",
        metrics={"image_auroc": 1.0}, data_version="d-undeployed", code_version="t",
        gates=PromotionGates(min_image_auroc=0.0),
    )  # fmt: skip
    assert (again.version, again.promoted, again.champion_version) == ("1", False, "1")
    assert "fod-undeployed v1 already: nothing new" in again.reasons[0]
    assert len(MlflowClient().search_model_versions("name='fod-undeployed'")) == 1
    MlflowClient().set_model_version_tag("fod-undeployed", "1", "deployed", "local")
    decision = decide("undeployed", "d-undeployed")
    assert not decision.retrain and "already (the champion)" in decision.reason
    # a version whose InferenceService never became Ready: the alias went back to the
    # served one (components.deploy); the check reports it and does not retry
    with mlflow.start_run() as second:  # a run registered once is not registered again
        pass
    register_model(
        tmp_path / "model", run_id=second.info.run_id, category="undeployed",
        metrics={"image_auroc": 1.0}, data_version="d-undeployed", code_version="t",
        gates=PromotionGates(min_image_auroc=0.0),
    )  # fmt: skip
    client = MlflowClient()
    client.set_registered_model_alias("fod-undeployed", "champion", "1")
    client.set_model_version_tag("fod-undeployed", "2", "deploy_failed", "not Ready in 600s")
    decision = decide("undeployed", "d-undeployed")
    assert not decision.retrain
    assert "v2 was trained" in decision.reason and "deployment failed" in decision.reason
