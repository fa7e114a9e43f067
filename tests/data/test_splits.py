"""Splits in every layout: validation is about ``val_fraction`` of the training normals,
each image drawn by its own identity (so adding or removing images never moves another),
test, validation's two parts and training never share an image, and a category with too
few normals is refused with the numbers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from fod_core.calibration import model_split
from fod_core.data import (
    DatasetError,
    describe_splits,
    load_category,
    split_roles,
    split_sizes,
    split_validation,
)

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


def within_draw(count: int, n: int, fraction: float) -> bool:
    """Each image is drawn on its own: the count is binomial, within 3.5 sd of n * f."""
    return abs(count - n * fraction) <= 3.5 * (n * fraction * (1 - fraction)) ** 0.5 + 1


@pytest.mark.parametrize("defects", [True, False], ids=["defects", "good-only"])
@pytest.mark.parametrize("format", ["mvtec", "btad", "mvtec3d", "folder"])
@pytest.mark.parametrize("val_fraction", [0.1, 0.25])
def test_split_sizes_and_no_shared_image(tmp_path, format, defects, val_fraction):
    data = load_category(make_layout(tmp_path, format, defects=defects), "part", format)
    train, val = split_validation(data.train, val_fraction)
    assert within_draw(len(val), len(data.train), val_fraction)
    choice, calibration = split_roles(val)
    assert sorted(choice + calibration, key=str) == sorted(val, key=str)
    assert not set(choice) & set(calibration)
    test_normals = [r for r in data.test if r.label == 0]
    assert test_normals, "a false-alarm rate needs held-out normals in every layout"
    paths = [r.path for r in train + val + data.test]
    assert len(paths) == len(set(paths))  # no image in two splits
    assert len(train) + len(val) + len(test_normals) == N_GOOD + (5 if defects else 0) * (
        format != "folder"
    )
    assert split_sizes(data, train, val, choice) == {
        "train": len(train),
        "validation": len(val),
        "validation_choice": len(choice),
        "validation_calibration": len(calibration),
        "test_normal": len(test_normals),
        "test_anomalous": 6 if defects else 0,
        "test_masks": 0,
    }


def test_folder_validation_is_not_the_test_hold_out(tmp_path):
    """The reported failure: 361 good images with defects gave 1 validation image, because
    both splits took the low end of one hash order. Each split now draws on its own."""
    root = make_layout(tmp_path, "folder", defects=True, n_good=361)
    data = load_category(root, "part", "folder")
    train, val = split_validation(data.train, 0.1)
    test_normals = sum(r.label == 0 for r in data.test)
    assert within_draw(test_normals, 361, 0.2)
    assert within_draw(len(val), 361 - test_normals, 0.1)
    assert len(train) + len(val) + test_normals == 361


def test_too_few_normals_for_validation_is_a_clear_error(tmp_path):
    data = load_category(
        make_layout(tmp_path, "folder", defects=False, n_good=12), "part", "folder"
    )
    with pytest.raises(DatasetError, match=r"of \d+ training normals.*at least 5 needed.*add"):
        split_validation(data.train, 0.1, min_val=5)


def _where(splits: dict) -> dict[str, str]:
    """identity -> its split (validation parts named), from ``describe_splits``."""
    where = {}
    for name in ("train", "test_normal", "test_anomalous"):
        where |= dict.fromkeys(splits[name], name)
    for part, images in splits["validation"].items():
        where |= dict.fromkeys(images, f"validation/{part}")
    return where


@pytest.mark.parametrize("format", ["folder", "mvtec"])
def test_adding_or_removing_images_never_moves_another(tmp_path, format):
    """Property: images added and removed at random, 25 times; every image that stays
    keeps its split (test hold-out, validation part, training)."""
    rng = random.Random(7)
    root = make_layout(tmp_path, format, defects=True, n_good=60)
    good = tmp_path / "part" / ("good" if format == "folder" else "train/good")
    before = _where(describe_splits(load_category(root, "part", format), 0.2))
    next_name = 1000
    for _ in range(25):
        files = sorted(good.iterdir())
        for path in rng.sample(files, rng.randint(0, 5)):
            path.unlink()
        for _ in range(rng.randint(0, 8)):
            _png(good / f"n{next_name}.png")
            next_name += 1
        after = _where(describe_splits(load_category(root, "part", format), 0.2))
        moved = {
            k: (before[k], after[k]) for k in before.keys() & after.keys() if before[k] != after[k]
        }
        assert not moved
        before = after


def test_mvtec3d_same_names_in_two_folders_are_two_images(tmp_path):
    """MVTec 3D-AD's train/good/rgb and validation/good/rgb both start at 000.png: the
    identity is the relative path, so neither can leak into the other's split."""
    base = tmp_path / "part"
    for i in range(40):
        _png(base / "train/good/rgb" / f"{i:03d}.png")
    for i in range(20):
        _png(base / "validation/good/rgb" / f"{i:03d}.png")
    _png(base / "test/good/rgb/000.png")
    data = load_category(tmp_path, "part", "mvtec3d")
    assert len({r.identity for r in data.train}) == 60
    splits = describe_splits(data, 0.3)
    val = splits["validation"]["choice"] + splits["validation"]["calibration"]
    assert not set(val) & set(splits["train"])
    manifest = {
        "data": {
            "choice_images": splits["validation"]["choice"],
            "calibration_images": splits["validation"]["calibration"],
        }
    }
    split = model_split(manifest, data)
    assert sorted(r.identity for r in split.train) == splits["train"]
    assert split.calibration_held_out
    assert not {r.path for r in split.train} & {r.path for r in split.validation}


def test_fod_data_splits_prints_every_image_once(tmp_path, capsys):
    import json

    from fod_core.cli import main

    root = make_layout(tmp_path, "folder", defects=True, n_good=40)
    argv = ["data", "splits", "--data", str(root), "--category", "part", "--format", "folder"]
    assert main([*argv, "--json"]) == 0
    splits = json.loads(capsys.readouterr().out)
    listed = [*splits["train"], *splits["test_normal"], *splits["test_anomalous"]]
    listed += splits["validation"]["choice"] + splits["validation"]["calibration"]
    assert len(listed) == len(set(listed)) == 46
    assert all(p.startswith(("good/", "defects/dent/")) for p in listed)
    assert splits["test_anomalous"] == [f"defects/dent/d{i:03d}.png" for i in range(6)]
    assert main(argv) == 0
    assert "validation/calibration" in capsys.readouterr().out
    # auto, as `fod train --val-fraction auto`: a third at most (40 normals hold no 45)
    assert main([*argv, "--val-fraction", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_fraction"] == pytest.approx(1 / 3, abs=1e-4)
    with pytest.raises(SystemExit):
        main([*argv, "--val-fraction", "most"])


@pytest.mark.parametrize("wanted", [5, 12, 20])
def test_the_auto_validation_fraction_holds_the_calibration_normals_asked(tmp_path, wanted):
    from fod_core.data import validation_fraction_for

    root = make_layout(tmp_path, "folder", defects=False, n_good=120)
    data = load_category(root, "part", "folder")
    fraction = validation_fraction_for(data.train, wanted, bounds=(0.05, 0.9))
    _, val = split_validation(data.train, fraction)
    _, calibration = split_roles(val)
    assert len(calibration) >= wanted
    smaller = round(fraction - 0.01, 4)  # a hundredth less no longer holds them
    if smaller >= 0.05:
        _, fewer = split_roles(split_validation(data.train, smaller)[1])
        assert len(fewer) < wanted
    # within its bounds: at least the floor, at most the cap (even when that holds fewer)
    assert validation_fraction_for(data.train, 1, bounds=(0.1, 0.3)) == 0.1
    assert validation_fraction_for(data.train, 10_000, bounds=(0.1, 0.3)) == 0.3
