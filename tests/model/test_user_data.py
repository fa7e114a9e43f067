"""A user's own data: no masks, good images only, one seed for the whole run."""

from __future__ import annotations

import shutil
from dataclasses import replace
from math import comb

import pytest
import torch
from PIL import Image
from scipy.special import beta as beta_fn

from fod_core.artifact import read_manifest
from fod_core.cache import LocalStore
from fod_core.config import TrainConfig, model_config_for
from fod_core.data import DatasetError, describe_splits, load_category
from fod_core.evaluate import evaluate_model
from fod_core.synthetic import make_good_only_folder, make_synthetic_dataset
from fod_core.train import train_model

CONFIG = model_config_for("compact", image_size=64)
SCHEDULE = TrainConfig(epochs=12, batch_size=8, lr=1e-3, val_fraction=0.2)


@pytest.fixture(scope="module")
def no_masks(tmp_path_factory):
    """MVTec layout with labelled defect images and no ground_truth/ at all; one test image
    is not even readable: training must not open the test set."""
    base = tmp_path_factory.mktemp("nomasks")
    root = make_synthetic_dataset(
        base / "data", "widget", n_train=28, n_test_good=8, n_test_defect=6, size=64, seed=5
    )
    shutil.rmtree(root / "widget" / "ground_truth")
    return base, root


def test_mvtec_without_masks_trains_and_evaluates_image_metrics(no_masks):
    base, root = no_masks
    broken = root / "widget/test/good/000.png"
    saved = broken.read_bytes()
    broken.write_bytes(b"not an image")  # training and calibration never read the test set
    outcome = train_model(
        root,
        "widget",
        base / "model",
        model_config=CONFIG,
        train_config=SCHEDULE,
        cache_store=LocalStore(base / "cache"),
        progress=False,
    )
    broken.write_bytes(saved)
    expected = describe_splits(load_category(root, "widget"), SCHEDULE.val_fraction)
    choice, calibration = expected["validation"]["choice"], expected["validation"]["calibration"]
    assert outcome.splits == {
        "train": len(expected["train"]),
        "validation": len(choice) + len(calibration),
        "validation_choice": len(choice),
        "validation_calibration": len(calibration),
        "test_normal": 8,
        "test_anomalous": 12,
        "test_masks": 0,
    }
    assert len(expected["train"]) + outcome.splits["validation"] == 28
    manifest = read_manifest(base / "model")
    assert manifest["data"]["splits"] == outcome.splits
    assert manifest["data"]["calibration_images"] == calibration
    n_cal = len(calibration)
    promise = manifest["calibration"]
    assert promise["n_normal"] == n_cal and promise["threshold_rank"] == 1
    assert promise["guaranteed_false_alarm_rate"] == pytest.approx(1 - 0.1 ** (1 / n_cal))

    metrics = evaluate_model(base / "model", root, "widget", base / "eval", progress=False)
    assert metrics["image_auroc"] >= 0.75, metrics  # a short schedule: the labels are read
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None
    assert metrics["evidence"] == "labelled"
    assert metrics["notes"] == [
        "pixel metrics (pixel AUROC, AUPRO) need masks: 12 of 12 anomalous test images have "
        "none; image metrics only"
    ]
    assert metrics["splits"] == outcome.splits
    assert metrics["n_normal"] == 8
    assert metrics["promised_false_alarm_rate"] == promise["guaranteed_false_alarm_rate"]
    # P(at least this many of 8 normals alarm) for a model at rank 1 of n_cal: by hand
    x = metrics["false_alarms"]
    by_hand = sum(
        comb(8, j) * beta_fn(j + 1, n_cal + 8 - j) / beta_fn(1, n_cal) for j in range(x, 9)
    )
    assert metrics["false_alarm_p_value"] == pytest.approx(by_hand)
    assert metrics["planted_image_auroc"] is not None  # a second opinion, always
    assert (base / "eval" / "roc.png").is_file()


def test_mask_of_another_size_is_a_clear_error_in_evaluation(no_masks, tmp_path):
    base, root = no_masks
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    for kind, side in (("scratch", 64), ("stain", 32)):  # stain masks: not their image's size
        (copy / f"widget/ground_truth/{kind}").mkdir(parents=True)
        for image in (copy / f"widget/test/{kind}").glob("*.png"):
            mask = copy / f"widget/ground_truth/{kind}/{image.stem}_mask.png"
            Image.new("L", (side, side), 0).save(mask)
    with pytest.raises(
        DatasetError, match=r"(?s)6 mask\(s\) differ in size.*stain/000_mask\.png \(32x32\)"
    ):
        evaluate_model(base / "model", copy, "widget", tmp_path / "eval", progress=False)


def test_good_only_folder_is_evaluated_on_held_out_normals(tmp_path):
    # 128 px: planted regions of 0.3-3 % of a 64 px image are a few pixels, which the
    # 8 x 8 token grid of a 64 px model cannot resolve
    root = make_good_only_folder(tmp_path / "data", "parts", n_good=50, size=128, seed=3)
    # 24 epochs: after 12 the planted AUROC sat at chance (0.44-0.83 by thread count and
    # micro-batch round-off); after 24 it was 0.79-0.82 on two data seeds, one thread
    schedule = replace(SCHEDULE, epochs=24)
    outcome = train_model(
        root,
        "parts",
        tmp_path / "model",
        format="folder",
        model_config=model_config_for("compact", image_size=128),
        train_config=schedule,
        cache_store=LocalStore(tmp_path / "cache"),
        progress=False,
    )
    expected = describe_splits(load_category(root, "parts", "folder"), schedule.val_fraction)
    n_test = len(expected["test_normal"])
    assert outcome.splits["train"] == len(expected["train"])
    assert outcome.splits["validation_calibration"] == len(expected["validation"]["calibration"])
    assert outcome.splits["test_normal"] == n_test > 0 and outcome.splits["test_anomalous"] == 0
    assert outcome.splits["train"] + outcome.splits["validation"] + n_test == 50
    metrics = evaluate_model(
        tmp_path / "model", root, "parts", tmp_path / "eval", format="folder", progress=False
    )
    assert metrics["evidence"] == "planted" and metrics["image_auroc"] is None
    assert metrics["n_normal"] == n_test and metrics["n_planted"] == 2 * n_test
    assert metrics["planted_image_auroc"] > 0.5, metrics  # better than chance
    assert 0.3 < metrics["planted_aupro"] <= 1, metrics
    assert (tmp_path / "eval" / "planted_histogram.png").is_file()
    assert "no labelled defects" in metrics["notes"][0]


def test_one_seed_gives_identical_weights(tmp_path):
    """Initial weights, data order and planted anomalies all follow the seed (run this test
    on its own too: it must not depend on what ran before)."""
    root = make_synthetic_dataset(
        tmp_path / "data", "widget", n_train=16, n_test_good=2, n_test_defect=1, size=64, seed=2
    )
    schedule = TrainConfig(
        epochs=2, batch_size=4, lr=1e-3, val_fraction=0.25, choice_fraction=0.5, seed=11
    )
    states = []
    for run in ("a", "b"):
        torch.manual_seed(int.from_bytes(run.encode(), "big"))  # a different global state
        train_model(
            root,
            "widget",
            tmp_path / run,
            model_config=CONFIG,
            train_config=schedule,
            cache_store=LocalStore(tmp_path / "cache"),
            level_weighting="synthetic",
            progress=False,
        )
        states.append(torch.load(tmp_path / run / "model.pt", weights_only=True))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    weights = [read_manifest(tmp_path / r)["postprocessing"].get("level_weights") for r in "ab"]
    assert weights[0] == weights[1]
