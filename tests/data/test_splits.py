"""Splits in every layout: validation is ``val_fraction`` of the training normals (plus or
minus one image), test, validation and training never share an image, and a category
with too few normals is refused with the numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fod_core.data import DatasetError, load_category, split_sizes, split_validation

N_GOOD = 50


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 90, 90)).save(path)


def make_layout(root: Path, format: str, *, defects: bool, n_good: int = N_GOOD) -> Path:
    """``root/part`` in ``format`` with ``n_good`` normal images and, when asked, labelled
    defect images without any mask (the common case in a factory)."""
    base = root / "part"
    good_dir, test_good, test_defect, sub = {
        "mvtec": ("train/good", "test/good", "test/dent", ""),
        "btad": ("train/ok", "test/ok", "test/ko", ""),
        "mvtec3d": ("train/good", "test/good", "test/dent", "rgb"),
        "folder": ("good", None, "defects/dent", ""),
    }[format]
    for i in range(n_good):
        _png(base / good_dir / sub / f"g{i:03d}.png")
    if defects:
        for i in range(6):
            _png(base / test_defect / sub / f"d{i:03d}.png")
        if test_good:
            for i in range(5):
                _png(base / test_good / sub / f"t{i:03d}.png")
    return root


@pytest.mark.parametrize("defects", [True, False], ids=["defects", "good-only"])
@pytest.mark.parametrize("format", ["mvtec", "btad", "mvtec3d", "folder"])
@pytest.mark.parametrize("val_fraction", [0.1, 0.25])
def test_split_sizes_and_no_shared_image(tmp_path, format, defects, val_fraction):
    data = load_category(make_layout(tmp_path, format, defects=defects), "part", format)
    train, val = split_validation(data.train, val_fraction)
    assert abs(len(val) - val_fraction * len(data.train)) <= 1
    test_normals = [r for r in data.test if r.label == 0]
    assert test_normals, "a false-alarm rate needs held-out normals in every layout"
    paths = [r.path for r in train + val + data.test]
    assert len(paths) == len(set(paths))  # no image in two splits
    assert len(train) + len(val) + len(test_normals) == N_GOOD + (5 if defects else 0) * (
        format != "folder"
    )
    assert split_sizes(data, train, val) == {
        "train": len(train),
        "validation": len(val),
        "test_normal": len(test_normals),
        "test_anomalous": 6 if defects else 0,
        "test_masks": 0,
    }


def test_folder_validation_is_not_the_test_hold_out(tmp_path):
    """The reported failure: 361 good images with defects gave 1 validation image, because
    both splits took the low end of one hash order."""
    root = make_layout(tmp_path, "folder", defects=True, n_good=361)
    data = load_category(root, "part", "folder")
    train, val = split_validation(data.train, 0.1)
    assert sum(r.label == 0 for r in data.test) == 72
    assert len(val) == 29 and len(train) == 260


def test_too_few_normals_for_validation_is_a_clear_error(tmp_path):
    data = load_category(
        make_layout(tmp_path, "folder", defects=False, n_good=12), "part", "folder"
    )
    with pytest.raises(DatasetError, match=r"1 of 10 training normals.*at least 5 needed.*add"):
        split_validation(data.train, 0.1, min_val=5)
