"""Data versioning in DVC over the real S3, and Great Expectations validation."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace

import pytest
from kfp.dsl import Artifact, Dataset, Metrics
from PIL import Image

from components import steps
from components.data_version import DvcRepo, read_data_version, remote_url
from components.storage import StorageError, fetch_dvc_directory
from components.validation import ValidationReport, ValidationRules, validate_images
from fod_core.config import TrainConfig
from fod_core.data import DatasetError, load_category
from fod_core.promise import DEFAULT_DELTA
from fod_core.synthetic import make_synthetic_dataset
from fod_core.train import training_split


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_dvc_version_round_trip(settings, tmp_path):
    repo_root = tmp_path / "repo"
    data = make_synthetic_dataset(
        repo_root / "data", "widget", n_train=6, n_test_good=2, n_test_defect=1, size=64, seed=3
    )
    repo = DvcRepo(repo_root)
    repo.ensure(settings, remote_url(settings, "dvc-tests"))
    version = repo.add_and_push(data)
    assert version == read_data_version(repo_root / "data.dvc")
    assert version.files == 6 + 2 + 2 * 2  # train, good, one image + one mask per defect type
    assert "secret" not in (repo_root / ".dvc" / "config").read_text()

    fetched = tmp_path / "fetched"
    count = fetch_dvc_directory(settings, remote_url(settings, "dvc-tests"), version.md5, fetched)
    assert count == version.files
    assert _digest(fetched) == _digest(data)

    # Adding an image makes a new version; the old one stays fetchable.
    shutil.copy(data / "widget/train/good/000.png", data / "widget/train/good/extra.png")
    (data / "widget/train/good/extra.png").write_bytes(
        (data / "widget/train/good/extra.png").read_bytes() + b"\x00"
    )
    newer = repo.add_and_push(data)
    assert newer.md5 != version.md5 and newer.files == version.files + 1
    assert (
        fetch_dvc_directory(
            settings, remote_url(settings, "dvc-tests"), version.md5, tmp_path / "old"
        )
        == version.files
    )


def test_unknown_data_version_is_a_clear_error(settings, tmp_path):
    with pytest.raises(StorageError, match="not in the DVC remote"):
        fetch_dvc_directory(
            settings, remote_url(settings, "dvc-tests"), "0" * 32 + ".dir", tmp_path
        )


def test_valid_data_passes_through_the_component(synthetic_root, tmp_path):
    summary = Metrics(uri=str(tmp_path / "summary"))
    docs = Artifact(uri=str(tmp_path / "docs"))
    passed = steps.validate_data.python_func(
        dataset=Dataset(uri=str(synthetic_root)),
        category="widget",
        data_format="mvtec",
        min_train_images=10,
        min_val_images=2,
        val_fraction="0.1",
        target_false_alarm_rate=0.01,
        min_image_size=64,
        require_masks=False,
        level_weights="synthetic",
        auto_recipe=True,
        data_docs=docs,
        summary=summary,
    )
    assert passed is True
    assert summary.metadata["failed_expectations"] == 0
    assert (tmp_path / "docs" / "index.html").is_file()


def test_corrupt_image_and_missing_mask_fail_with_file_names(synthetic_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(synthetic_root, root)
    (root / "widget/train/good/003.png").write_bytes(b"\x89PNG truncated")
    next((root / "widget/ground_truth/stain").glob("*.png")).unlink()
    shutil.copy(root / "widget/train/good/004.png", root / "widget/train/good/copy.png")

    rules = ValidationRules(min_val=2, require_masks=True)
    report = validate_images(root, "widget", rules=rules, docs_dir=tmp_path / "docs")
    assert not report.success
    message = report.message()
    assert "widget/train/good/003.png" in message
    assert "widget/test/stain/000.png" in message
    assert "copy.png" in message and "duplicates" in message
    assert (tmp_path / "docs" / "index.html").is_file()
    # The failure step of the pipeline raises the same readable report.
    with pytest.raises(RuntimeError, match=r"003\.png"):
        steps.fail_validation.python_func(data_docs=Artifact(uri=str(tmp_path / "docs")))
    assert ValidationReport.load(tmp_path / "docs").failures == report.failures


def test_missing_masks_are_a_warning_with_their_count(synthetic_root, tmp_path):
    root = tmp_path / "nomasks"
    shutil.copytree(synthetic_root, root)
    shutil.rmtree(root / "widget/ground_truth")
    report = validate_images(root, "widget", rules=ValidationRules(min_val=2))
    assert report.success, report.message()
    assert report.warnings == [
        "8 of 8 defect images have no mask: image metrics only (pixel AUROC and AUPRO need "
        "masks; require_masks makes this an error)"
    ]
    assert "warning: 8 of 8 defect images have no mask" in report.message()
    strict = validate_images(root, "widget", rules=ValidationRules(min_val=2, require_masks=True))
    assert not strict.success and "missing" in strict.message()


def test_mask_of_another_size_fails_even_when_masks_are_optional(synthetic_root, tmp_path):
    root = tmp_path / "badmask"
    shutil.copytree(synthetic_root, root)
    Image.new("L", (40, 30), 255).save(root / "widget/ground_truth/scratch/001_mask.png")
    report = validate_images(root, "widget", rules=ValidationRules(min_val=2))
    assert not report.success
    assert "size_mismatch" in report.message() and "widget/test/scratch/001.png" in report.message()


def test_too_few_normals_for_validation_fail_with_the_rule(synthetic_root, tmp_path):
    report = validate_images(synthetic_root, "widget", rules=ValidationRules(min_val=5))
    assert not report.success
    assert "too few normal images left for validation: 3 of 24" in report.message()
    assert "min_val_images" in report.message()


def test_an_auto_validation_fraction_is_checked_as_training_will_split(synthetic_root):
    """val_fraction auto (the pipeline's default): validation counts what training will hold
    out."""
    normals = load_category(synthetic_root, "widget", "mvtec").train
    _, split = training_split(normals, TrainConfig(val_fraction=None), 0.01, DEFAULT_DELTA)
    report = validate_images(synthetic_root, "widget", rules=ValidationRules(val_fraction=None))
    assert report.success, report.message()
    assert report.counts["validation"] == len(split.validation) > 0.3 * len(normals)
    assert report.counts["train"] == len(split.train)


def test_no_validation_normal_to_choose_on_fails_before_training(synthetic_root, tmp_path):
    """Level weights and the recipe (the pipeline's defaults) are chosen on the validation's
    choice part: validation says so when it is empty, not training an hour later."""
    root = tmp_path / "nochoice"
    shutil.copytree(synthetic_root, root)
    (root / "widget/train/good/022.png").unlink()  # the one choice image of 005, 019, 022
    rules = ValidationRules(min_val=2, min_choice=1)
    report = validate_images(root, "widget", rules=rules)
    assert not report.success and report.counts["validation_choice"] == 0
    assert "none of the 2 validation normals fell into the part" in report.message()
    assert "auto_recipe false and level_weights equal" in report.message()
    assert validate_images(root, "widget", rules=replace(rules, min_choice=0)).success


def test_empty_good_folder_is_a_clear_error(tmp_path):
    (tmp_path / "parts/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images .* in .*parts/good"):
        validate_images(tmp_path, "parts", "folder")
