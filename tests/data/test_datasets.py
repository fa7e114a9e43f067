"""Dataset layouts, validation split, and the real MVTec bottle data when present."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fod_core.data import DatasetError, DatasetFormat, load_category, split_validation


def write_png(path: Path, size: int = 16, value: int = 128, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value if mode == "L" else (value,) * 3).save(path)
    return path


def test_mvtec_layout(synthetic_root):
    data = load_category(synthetic_root, "widget", "mvtec")
    assert len(data.train) == 24
    assert data.summary()["test_normal"] == 6
    assert data.defect_types == ["scratch", "stain"]
    assert data.has_masks
    assert all(r.mask_path.name == f"{r.path.stem}_mask.png" for r in data.test if r.label)


def test_missing_mask_is_listed_or_named_when_required(synthetic_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root / "widget", root / "widget")
    (root / "widget/ground_truth/stain/001_mask.png").unlink()
    data = load_category(root, "widget")  # masks are optional: listed without one
    unmasked = [r.path.name for r in data.test if r.label and r.mask_path is None]
    assert unmasked == ["001.png"] and not data.has_masks
    with pytest.raises(DatasetError, match=r"1 anomalous test images have no mask:\n.*stain/001"):
        load_category(root, "widget", require_masks=True)


def test_empty_or_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="category 'nope' not found"):
        load_category(tmp_path, "nope")
    (tmp_path / "empty/train/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        load_category(tmp_path, "empty")


def test_btad_layout(tmp_path):
    base = tmp_path / "01"
    for i in range(3):
        write_png(base / "train/ok" / f"{i:04d}.bmp")
    write_png(base / "test/ok/0000.bmp")
    write_png(base / "test/ko/0001.bmp")
    write_png(base / "ground_truth/ko/0001.png", mode="L", value=255)
    data = load_category(tmp_path, "01", DatasetFormat.BTAD)
    assert len(data.train) == 3
    assert [(r.label, r.defect_type) for r in data.test] == [(1, "ko"), (0, "good")]
    assert data.test[0].mask_path.name == "0001.png"


def test_mvtec3d_rgb_layout(tmp_path):
    base = tmp_path / "bagel"
    write_png(base / "train/good/rgb/000.png")
    write_png(base / "validation/good/rgb/000.png")
    write_png(base / "test/good/rgb/000.png")
    write_png(base / "test/crack/rgb/000.png")
    write_png(base / "test/crack/gt/000.png", mode="L", value=255)
    data = load_category(tmp_path, "bagel", "mvtec3d")
    assert len(data.train) == 2  # train + the layout's validation images, all normal
    anomalous = [r for r in data.test if r.label]
    assert anomalous[0].mask_path == base / "test/crack/gt/000.png"


def test_folder_layout_with_and_without_defects(tmp_path):
    for i in range(10):
        write_png(tmp_path / "parts/good" / f"{i}.png")
    only_good = load_category(tmp_path, "parts", "folder")
    # good images only: a fifth is held out as test normals, for the false-alarm rate
    assert len(only_good.train) == 8 and [r.label for r in only_good.test] == [0, 0]
    write_png(tmp_path / "parts/defects/dent/d1.png")
    write_png(tmp_path / "parts/masks/dent/d1.png", mode="L", value=255)
    write_png(tmp_path / "parts/defects/dent/d2.png")  # masks are optional here
    data = load_category(tmp_path, "parts", "folder")
    assert len(data.train) == 8 and sum(r.label == 0 for r in data.test) == 2
    masks = {r.path.name: r.mask_path for r in data.test if r.label}
    assert masks["d1.png"] is not None and masks["d2.png"] is None
    assert not data.has_masks


def test_validation_split_depends_on_names_only(synthetic_root):
    records = load_category(synthetic_root, "widget").train
    train, val = split_validation(records, 0.2)
    assert 0 < len(val) < len(records) and len(train) + len(val) == len(records)
    assert set(split_validation(list(reversed(records)), 0.2)[1]) == set(val)
    assert split_validation(records, 0.0)[1] == []
    with pytest.raises(ValueError):
        split_validation(records, 1.0)


def test_real_mvtec_bottle(mvtec_root):
    data = load_category(mvtec_root, "bottle")
    assert len(data.train) == 209
    assert len(data.test) == 83
    assert sum(r.mask_path is not None for r in data.test) == 63
    assert data.defect_types == ["broken_large", "broken_small", "contamination"]
    with Image.open(next(r for r in data.test if r.label).mask_path) as mask:
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
