"""Data versioning in DVC over the real S3, and Great Expectations validation."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from kfp.dsl import Artifact, Dataset, Metrics

from components import steps
from components.data_version import DvcRepo, read_data_version, remote_url
from components.storage import StorageError, fetch_dvc_directory
from components.validation import ValidationReport, validate_images
from fod_core.synthetic import make_synthetic_dataset


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
        min_train=10,
        min_size=64,
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

    report = validate_images(root, "widget", docs_dir=tmp_path / "docs")
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
