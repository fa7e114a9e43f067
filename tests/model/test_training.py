"""End-to-end: train on generated data with planted defects, evaluate, resume, predict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fod_core.artifact import ArtifactError, load_detector, read_manifest
from fod_core.cache import LocalStore
from fod_core.config import LevelConfig, ModelConfig, TrainConfig, model_config_for
from fod_core.data import DatasetError, load_category, split_roles, split_validation
from fod_core.evaluate import evaluate_model
from fod_core.synthetic import make_synthetic_dataset
from fod_core.train import train_model
from fod_core.trainer import CheckpointMismatchError

EPOCHS = 30
E2E = model_config_for("compact", image_size=64)
TINY = ModelConfig(
    image_size=64,
    levels=(
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
        LevelConfig(d_model=32, n_heads=4, n_layers=1),
    ),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The compact FOD architecture trained on a generated dataset, then evaluated."""
    base = tmp_path_factory.mktemp("e2e")
    root = make_synthetic_dataset(
        base / "data", "widget", n_train=28, n_test_good=8, n_test_defect=6, size=64, seed=5
    )
    outcome = train_model(
        root,
        "widget",
        base / "model",
        model_config=E2E,
        train_config=TrainConfig(epochs=EPOCHS, batch_size=8, lr=1e-3, val_fraction=0.2),
        cache_store=LocalStore(base / "cache"),
        progress=False,
    )
    metrics = evaluate_model(base / "model", root, "widget", base / "eval", progress=False)
    return base, root, outcome, metrics


def test_planted_defects_are_found(trained):
    _, _, _, metrics = trained
    assert metrics["image_auroc"] >= 0.9, metrics
    assert metrics["pixel_auroc"] >= 0.75, metrics


def test_report_and_artefact(trained):
    base, _, outcome, _ = trained
    written = json.loads((base / "eval" / "metrics.json").read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "f1_max", "per_defect_type"} <= set(written)
    assert set(written["per_defect_type"]) == {"scratch", "stain"}
    for plot in ("roc.png", "score_histogram.png", "predictions.csv"):
        assert (base / "eval" / plot).is_file()
    assert len(list((base / "eval" / "overlays").rglob("*.png"))) == 8 + 12
    manifest = read_manifest(base / "model")
    assert manifest["postprocessing"]["threshold"] == pytest.approx(outcome.threshold.value)
    assert manifest["calibration"]["threshold_mode"] == "false_alarm_rate"
    assert 1 <= manifest["training"]["best_epoch"] <= EPOCHS
    assert not (base / "model" / "checkpoints").exists()
    phases = [p["name"] for p in manifest["training"]["memory"]["phases"]]
    assert phases == ["features", "training", "level_weights", "threshold"]
    assert [p["name"] for p in written["memory"]["phases"]] == [
        "scoring", "metrics", "planted", "report"
    ]  # fmt: skip
    assert all(p["peak_rss_mb"] > 0 for p in written["memory"]["phases"])
    assert sorted(p.name for p in (base / "model").iterdir()) == [
        "backbone.pt",
        "fod.json",
        "model.pt",
        "training_curves.png",
    ]


def test_predict_cli_matches_the_detector(trained):
    base, root, _, _ = trained
    images = sorted((root / "widget" / "test" / "stain").glob("*.png"))[:2]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fod_core.cli",
            "-q",
            "predict",
            "--model",
            str(base / "model"),
            *map(str, images),
            "--heatmaps",
            str(base / "heatmaps"),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**_env(), "FOD_COMPILE": "0"},
    )
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    direct = load_detector(base / "model").predict(images)
    for line, prediction in zip(lines, direct, strict=True):
        assert line["score"] == pytest.approx(prediction.score, rel=1e-5, abs=1e-7)
        assert line["is_anomalous"] == prediction.is_anomalous
        assert (base / "heatmaps").joinpath(line["heatmap"].split("/")[-1]).is_file()


def test_second_training_extracts_nothing(trained, tmp_path):
    base, root, _, _ = trained
    outcome = train_model(
        root,
        "widget",
        tmp_path / "m",
        model_config=E2E,
        train_config=TrainConfig(epochs=1, val_fraction=0.2),
        cache_store=LocalStore(base / "cache"),
        progress=False,
    )
    assert outcome.cache["train"].misses == 0 and outcome.cache["val"].misses == 0
    assert outcome.cache["train"].hits > 0


def _seed_everything(seed: int) -> None:
    """Every global generator a training run could draw from, so that a run does not
    depend on what earlier tests left behind."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_interrupted_training_resumes_to_the_same_weights(synthetic_root, tmp_path):
    """Each run starts from the same global random state (set here, not inherited from
    the tests before it), so the straight and the interrupted run begin alike."""
    config = TrainConfig(epochs=3, batch_size=4, lr=1e-3, val_fraction=0.2)
    store = LocalStore(tmp_path / "cache")
    _seed_everything(0)
    reference = train_model(
        synthetic_root,
        "widget",
        tmp_path / "straight",
        model_config=TINY,
        train_config=config,
        cache_store=store,
        progress=False,
    )

    def interrupt(epoch, model):
        if epoch == 2:
            raise KeyboardInterrupt

    _seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        train_model(
            synthetic_root,
            "widget",
            tmp_path / "resumed",
            model_config=TINY,
            train_config=config,
            cache_store=store,
            progress=False,
            on_epoch_end=interrupt,
        )
    assert (tmp_path / "resumed" / "checkpoints" / "last.pt").is_file()
    with pytest.raises(CheckpointMismatchError, match="other training settings"):
        train_model(
            synthetic_root,
            "widget",
            tmp_path / "resumed",
            model_config=TINY,
            train_config=TrainConfig(epochs=3, batch_size=2, val_fraction=0.2),
            cache_store=store,
            progress=False,
            resume=True,
        )
    _seed_everything(0)
    resumed = train_model(
        synthetic_root,
        "widget",
        tmp_path / "resumed",
        model_config=TINY,
        train_config=config,
        cache_store=store,
        progress=False,
        resume=True,
    )
    assert [r.epoch for r in resumed.result.history] == [1, 2, 3]
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.result.best_epoch == reference.result.best_epoch


def test_cli_errors_are_readable(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fod_core.cli",
            "train",
            "--data",
            str(tmp_path),
            "--category",
            "missing",
            "--out",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert out.returncode == 2
    assert "category 'missing' not found" in out.stderr
    with pytest.raises(ArtifactError, match="not an FOD model directory"):
        load_detector(tmp_path)
    calibrate = [sys.executable, "-m", "fod_core.cli", "calibrate", "--model", str(tmp_path)]
    calibrate += ["--data", str(tmp_path), "--category", "c", "--mode", "f1"]
    out = subprocess.run(calibrate, capture_output=True, text=True, env=_env())
    assert out.returncode == 2
    assert "--mode f1 needs labelled validation anomalies" in out.stderr


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_recalibration_with_labelled_anomalies_is_f1_optimal(trained, tmp_path):
    import shutil

    from fod_core.calibration import ThresholdMode, calibrate_model

    base, root, outcome, _ = trained
    model_dir = tmp_path / "model"
    shutil.copytree(base / "model", model_dir)
    anomalies = sorted((root / "widget" / "test" / "scratch").glob("*.png"))[:3]
    threshold = calibrate_model(model_dir, root, "widget", anomalous_images=anomalies)
    assert threshold.mode is ThresholdMode.F1 and threshold.n_anomalous == 3
    manifest = read_manifest(model_dir)
    assert manifest["postprocessing"]["threshold"] == pytest.approx(threshold.value)
    assert manifest["calibration"]["threshold_mode"] == "f1"
    assert load_detector(model_dir).post.threshold == pytest.approx(threshold.value)
    # Without anomalies it is the false-alarm quantile again, as training wrote it.
    again = calibrate_model(model_dir, root, "widget")
    assert again.mode is ThresholdMode.FALSE_ALARM_RATE
    assert again.value == pytest.approx(outcome.threshold.value, rel=1e-5)


def test_more_good_parts_tighten_the_promise_without_retraining(trained, tmp_path):
    """`fod calibrate --normals DIR`: new good parts join the calibration part; the
    promise is recomputed on more normals; images the model trained on are refused."""
    import shutil

    base, root, _, _ = trained
    model_dir = tmp_path / "model"
    shutil.copytree(base / "model", model_dir)
    before = read_manifest(model_dir)["calibration"]
    new = make_synthetic_dataset(tmp_path / "new", "widget", n_train=30, n_test_good=1,
                                 n_test_defect=1, size=64, seed=23)  # fmt: skip
    normals = new / "widget" / "train" / "good"
    command = [sys.executable, "-m", "fod_core.cli", "-q", "calibrate", "--model",
               str(model_dir), "--data", str(root), "--category", "widget",
               "--normals", str(normals)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stderr
    after = read_manifest(model_dir)["calibration"]
    assert after["n_normal"] == before["n_normal"] + 30 and after["extra_normals"] == 30
    assert after["guaranteed_false_alarm_rate"] < before["guaranteed_false_alarm_rate"]
    expected = sorted(after["validation_scores"], reverse=True)[after["threshold_rank"] - 1]
    assert after["threshold"] == pytest.approx(expected)
    assert f"from {after['n_normal']} good parts" in after["promise"]
    # a training image (a copy under another name) is refused, and the artefact kept
    seen = tmp_path / "seen"
    seen.mkdir()
    training = sorted((root / "widget" / "train" / "good").glob("*.png"))
    trained_on = read_manifest(model_dir)["data"]["validation_images"]
    first_training = next(p for p in training if f"train/good/{p.name}" not in trained_on)
    shutil.copy(first_training, seen / "renamed.png")
    out = subprocess.run([*command[:-1], str(seen)], capture_output=True, text=True, env=_env())
    assert out.returncode == 2 and "images this model trained, chose or calibrated" in out.stderr
    assert read_manifest(model_dir)["calibration"] == after
    # nor a calibration image again (it would count twice), nor a test image
    calibration = read_manifest(model_dir)["data"]["calibration_images"][0]
    test_image = sorted((root / "widget" / "test" / "good").glob("*.png"))[0]
    for image in (root / "widget" / calibration, test_image):
        shutil.copy(image, seen / "renamed.png")
        out = subprocess.run([*command[:-1], str(seen)], capture_output=True, text=True, env=_env())
        assert out.returncode == 2 and "or its test images" in out.stderr


def test_the_pipelines_calibration_takes_more_good_parts_from_the_data(trained, tmp_path, stack):
    """The pipeline's equivalent of ``--normals``: ``normals_subdir``, a folder of more good
    parts in the data version, joins the calibration part; a folder that is not there is a
    clear error, not a silent no-op. The evaluation forecasts what more would change."""
    import shutil

    import mlflow
    from kfp.dsl import Dataset, Model

    from components import steps

    base, root, _, metrics = trained
    forecast = metrics["more_normals"]
    calibrated = read_manifest(base / "model")["calibration"]
    assert forecast[0]["n_normal"] == calibrated["n_normal"] and forecast[0]["more"] == 0
    assert any(row["more"] > 0 for row in forecast)

    data = tmp_path / "data"
    shutil.copytree(root, data)
    new = make_synthetic_dataset(tmp_path / "new", "widget", n_train=30, n_test_good=1,
                                 n_test_defect=1, size=64, seed=29)  # fmt: skip
    shutil.copytree(new / "widget" / "train" / "good", data / "widget" / "more_good")
    with mlflow.start_run() as run:
        pass
    arguments = dict(
        dataset=Dataset(uri=str(data)), trained_model=Model(uri=str(base / "model")),
        category="widget", data_format="mvtec", threshold_mode="auto",
        target_false_alarm_rate=0.01, anomalies_subdir="", level_weights="equal",
        planting="anywhere", run_id=run.info.run_id,
    )  # fmt: skip
    model = Model(uri=str(tmp_path / "calibrated"))
    steps.calibrate_threshold.python_func(normals_subdir="more_good", model=model, **arguments)
    after = read_manifest(model.path)["calibration"]
    assert after["extra_normals"] == 30 and after["n_normal"] == calibrated["n_normal"] + 30
    with pytest.raises(DatasetError, match="normals_subdir 'missing': no images"):
        steps.calibrate_threshold.python_func(
            normals_subdir="missing", model=Model(uri=str(tmp_path / "again")), **arguments
        )


def test_level_weights_chosen_on_planted_anomalies(trained, tmp_path):
    """`fod calibrate --level-weights synthetic`, then back to the method's average."""
    import shutil

    from fod_core.calibration import calibrate_model

    base, root, _, _ = trained
    model_dir = tmp_path / "model"
    shutil.copytree(base / "model", model_dir)
    command = ["calibrate", "--model", str(model_dir), "--data", str(root)]
    command += ["--category", "widget", "--level-weights", "synthetic"]
    out = subprocess.run(
        [sys.executable, "-m", "fod_core.cli", "-q", *command],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    manifest = read_manifest(model_dir)
    weights = manifest["postprocessing"]["level_weights"]
    assert printed["level_weights"] == weights and sum(weights) == pytest.approx(1.0)
    assert manifest["format_version"] == 2
    choice = manifest["level_weights"]
    # chosen on the validation's choice part; the threshold on the disjoint rest
    n_choice = len(manifest["data"]["choice_images"])
    assert n_choice == manifest["data"]["splits"]["validation_choice"] > 0
    assert (choice["n_normal"], choice["n_anomalous"]) == (n_choice, 3 * n_choice)
    assert len(choice["candidates"]) == 11 and (model_dir / "level_weights.png").is_file()
    detector = load_detector(model_dir)
    assert detector.post.level_weights == tuple(weights)
    # The threshold is re-derived on the weighted map: the validation quantile again.
    val_scores = manifest["calibration"]["validation_scores"]
    assert detector.post.threshold == pytest.approx(max(val_scores))
    _, val = split_validation(load_category(root, "widget").train, 0.2)
    _, calibration = split_roles(val)
    assert sorted(r.identity for r in calibration) == manifest["data"]["calibration_images"]
    rescored = [p.score for p in detector.predict([r.path for r in calibration])]
    assert rescored == pytest.approx(val_scores, rel=1e-5)

    # Weights that do not fit the model are refused when it loads, not at the first image.
    broken = json.loads((model_dir / "fod.json").read_text())
    broken["postprocessing"]["level_weights"] = [0.5, 0.3, 0.2]
    (tmp_path / "broken").mkdir()
    for name in ("model.pt", "backbone.pt"):
        shutil.copy(model_dir / name, tmp_path / "broken" / name)
    (tmp_path / "broken" / "fod.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="do not fit a model of 2 branches"):
        load_detector(tmp_path / "broken")
    broken["postprocessing"]["level_weights"] = [0.0, 0.0]  # would score no level at all
    (tmp_path / "broken" / "fod.json").write_text(json.dumps(broken))
    with pytest.raises(ArtifactError, match="summing to 1"):
        load_detector(tmp_path / "broken")

    calibrate_model(model_dir, root, "widget", level_weighting="equal")
    manifest = read_manifest(model_dir)
    assert "level_weights" not in manifest["postprocessing"]
    assert manifest["format_version"] == 1
    assert not (model_dir / "level_weights.png").exists()  # no plot of the earlier choice
    assert load_detector(model_dir).post.threshold == pytest.approx(
        read_manifest(base / "model")["postprocessing"]["threshold"], rel=1e-5
    )


def test_training_with_synthetic_level_weights(synthetic_root, tmp_path):
    def train(out: str, val_fraction: float):
        return train_model(
            synthetic_root,
            "widget",
            tmp_path / out,
            model_config=TINY,
            train_config=TrainConfig(epochs=1, val_fraction=val_fraction),
            cache_store=LocalStore(tmp_path / "cache"),
            level_weighting="synthetic",
            progress=False,
        )

    outcome = train("m", 0.2)
    assert outcome.level_weights is not None and len(outcome.level_weights.weights) == 2
    post = read_manifest(tmp_path / "m")["postprocessing"]
    assert post["level_weights"] == list(outcome.level_weights.weights)
    assert (tmp_path / "m" / "level_weights.png").is_file()
    with pytest.raises(DatasetError, match="needs validation images"):
        train("m0", 0.0)
    assert not (tmp_path / "m0").exists()  # refused before any training


def test_one_level_models_have_nothing_to_weight(synthetic_root, tmp_path):
    from dataclasses import replace

    from fod_core.backbone import BackboneSpec

    one_level = replace(TINY, backbone=BackboneSpec(out_indices=(2,)), levels=TINY.levels[:1])
    outcome = train_model(
        synthetic_root,
        "widget",
        tmp_path / "m",
        model_config=one_level,
        train_config=TrainConfig(epochs=1, val_fraction=0.2),
        cache_store=LocalStore(tmp_path / "cache"),
        level_weighting="synthetic",
        progress=False,
    )
    assert outcome.level_weights is None
    assert read_manifest(tmp_path / "m")["format_version"] == 1


def test_without_validation_images_nothing_is_promised(synthetic_root, tmp_path):
    """--val-fraction 0: the threshold comes from training images, and every place that
    shows the promise says there is none (artefact, registry tag, fod predict)."""
    from components.registry import threshold_tag
    from fod_core.predict import predict_images

    outcome = train_model(
        synthetic_root,
        "widget",
        tmp_path / "m",
        model_config=TINY,
        train_config=TrainConfig(epochs=1, val_fraction=0.0),
        cache_store=LocalStore(tmp_path / "cache"),
        progress=False,
    )
    calibration = read_manifest(tmp_path / "m")["calibration"]
    assert calibration["held_out"] is False and calibration["calibrated_on"] == "training images"
    assert calibration["promise"].startswith("no false-alarm guarantee")
    assert outcome.threshold.describe() == calibration["promise"]
    assert "no false-alarm guarantee" in threshold_tag(tmp_path / "m")
    image = next((synthetic_root / "widget" / "test" / "good").glob("*.png"))
    (predicted,) = predict_images(tmp_path / "m", [image])
    assert predicted["promise"].startswith("no false-alarm guarantee")


def test_parts_at_any_angle_train_aligned_and_maps_come_back_onto_the_photo(tmp_path):
    """The first user's layout (a folder of good parts, no labels) with parts lying at
    any angle: training, calibration on planted anomalies and prediction all go through
    the same pose normalisation, and the map a user sees is on the photo as it was."""
    from dataclasses import replace

    from fod_core.processing import Alignment, PostProcessing
    from fod_core.synthetic import make_rotated_parts_folder, rotated_part

    root = make_rotated_parts_folder(tmp_path / "data", n_good=20, size=64, seed=1)
    aligned = replace(TINY, alignment=Alignment.PRINCIPAL_AXIS)
    train_model(
        root,
        "screwlike",
        tmp_path / "m",
        format="folder",
        model_config=aligned,
        train_config=TrainConfig(epochs=1, val_fraction=0.25),
        cache_store=LocalStore(tmp_path / "cache"),
        level_weighting="synthetic",
        progress=False,
    )
    manifest = read_manifest(tmp_path / "m")
    assert manifest["preprocessing"]["alignment"] == "principal_axis"
    assert manifest["model"]["alignment"] == "principal_axis"
    assert manifest["format_version"] == 3  # readers that know no poses refuse it clearly
    detector = load_detector(tmp_path / "m")
    assert detector.pre.alignment is Alignment.PRINCIPAL_AXIS
    photo = rotated_part(128, size=64, centre=(30, 35), seed=99)
    prediction = detector.predict([photo])[0]
    model_input, pose = detector.pre.transform(photo)
    assert pose is not None
    maps, scores = detector.score_batch(model_input[None])
    assert prediction.score == pytest.approx(float(scores[0]))  # scored where it was aligned
    expected = PostProcessing.to_input_frame(maps, [pose])[0].numpy()
    assert prediction.anomaly_map.shape == (64, 64)
    assert torch.allclose(torch.from_numpy(prediction.anomaly_map), torch.from_numpy(expected))
    assert not torch.allclose(torch.from_numpy(prediction.anomaly_map), maps[0])
