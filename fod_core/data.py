"""Dataset layouts: MVTec AD, BTAD, MVTec AD-3D (RGB) and a generic folder of good images.

Every loader returns the same typed records. Three disjoint sets of images exist:
- test: the layout's test images; when the layout has no normal test images (a folder
  of good parts), a ``test_fraction`` of the normal images is held out as test normals,
  so a false-alarm rate can always be measured on images no choice has seen;
- validation: a ``val_fraction`` of the remaining normal images, in two disjoint parts:
  *choice* (best epoch, level weights, any recipe setting) and *calibration* (the
  threshold alone, so that its false-alarm promise holds after the choices);
- train: the rest. Test labels are never used for a choice.

Each image's split depends on its own identity alone (its path relative to the category
folder, hashed with a salt per split), so adding or removing other images never moves it.

Masks are optional in every layout: training and calibration never read the test set,
and evaluation gives image metrics alone when anomalous images have no mask.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
NORMAL = "good"


class DatasetFormat(str, Enum):
    MVTEC = "mvtec"
    BTAD = "btad"
    MVTEC3D = "mvtec3d"
    FOLDER = "folder"


class DatasetError(ValueError):
    """A dataset folder that does not have the expected layout; says what is missing."""


@dataclass(frozen=True)
class ImageRecord:
    """One image: where it is, whether it is anomalous, of which type, and its mask."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str = NORMAL
    mask_path: Path | None = None
    key: str = ""  # the path relative to the category folder (set by `load_category`)

    @property
    def identity(self) -> str:
        """What the split hashes and the manifest records: two files of one name in two
        folders (MVTec 3D-AD's train and validation) are two images."""
        return self.key or self.path.name


@dataclass
class CategoryData:
    """The images of one category (product), split as the layout defines."""

    name: str
    root: Path
    format: DatasetFormat
    train: list[ImageRecord] = field(default_factory=list)  # normal images only
    test: list[ImageRecord] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        return sorted({r.defect_type for r in self.test if r.label == 1})

    @property
    def has_masks(self) -> bool:
        anomalous = [r for r in self.test if r.label == 1]
        return bool(anomalous) and all(r.mask_path is not None for r in anomalous)

    def summary(self) -> dict:
        return {
            "category": self.name,
            "format": self.format.value,
            "train": len(self.train),
            "test": len(self.test),
            "test_normal": sum(r.label == 0 for r in self.test),
            "test_anomalous": sum(r.label == 1 for r in self.test),
            "masks": sum(r.mask_path is not None for r in self.test),
            "defect_types": self.defect_types,
        }


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def images_in_folder_tree(folder: Path) -> list[Path]:
    """Images in ``folder``'s sub-folders (one level, e.g. one per defect type), then in
    ``folder`` itself: what a user drops under a category for calibration."""
    nested = [p for sub in sorted(folder.glob("*")) if sub.is_dir() for p in list_images(sub)]
    return nested + list_images(folder)


def _require_images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{what}: folder not found: {folder}")
    images = list_images(folder)
    if not images:
        raise DatasetError(f"{what}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return images


def _find_mask(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        for ext in (".png", ".bmp", ".jpg", ".tif", ".tiff"):
            candidate = folder / f"{stem}{suffix}{ext}"
            if candidate.is_file():
                return candidate
    return None


def _attach_masks(
    records: list[ImageRecord], mask_dir_of, suffixes: tuple[str, ...], required: bool
) -> list[ImageRecord]:
    result, missing = [], []
    for record in records:
        if record.label == 0:
            result.append(record)
            continue
        mask = _find_mask(mask_dir_of(record), record.path.stem, suffixes)
        if mask is None and required:
            missing.append(str(record.path))
        result.append(ImageRecord(record.path, 1, record.defect_type, mask))
    if missing:
        shown = "\n  ".join(missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DatasetError(f"{len(missing)} anomalous test images have no mask:\n  {shown}{more}")
    return result


def _test_records(test_dir: Path, normal_names: set[str], image_sub: str = "") -> list[ImageRecord]:
    records = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        label = 0 if type_dir.name in normal_names else 1
        defect = NORMAL if label == 0 else type_dir.name
        for path in list_images(type_dir / image_sub if image_sub else type_dir):
            records.append(ImageRecord(path, label, defect))
    return records


def load_mvtec(root: Path, category: str, *, require_masks: bool = False) -> CategoryData:
    base = root / category
    train = [ImageRecord(p, 0) for p in _require_images(base / "train" / "good", "MVTec train")]
    test = _test_records(base / "test", {"good"}) if (base / "test").is_dir() else []
    test = _attach_masks(
        test, lambda r: base / "ground_truth" / r.defect_type, ("_mask", ""), required=require_masks
    )
    return CategoryData(category, root, DatasetFormat.MVTEC, train, test)


def load_btad(root: Path, category: str, *, require_masks: bool = False) -> CategoryData:
    base = root / category
    train = [ImageRecord(p, 0) for p in _require_images(base / "train" / "ok", "BTAD train")]
    test = _test_records(base / "test", {"ok"}) if (base / "test").is_dir() else []
    test = _attach_masks(
        test, lambda r: base / "ground_truth" / "ko", ("", "_mask"), required=require_masks
    )
    return CategoryData(category, root, DatasetFormat.BTAD, train, test)


def load_mvtec3d(root: Path, category: str, *, require_masks: bool = False) -> CategoryData:
    """RGB only. The layout's validation/good images are normal: they join the training pool,
    from which our own validation split is drawn."""
    base = root / category
    train = [
        ImageRecord(p, 0) for p in _require_images(base / "train" / "good" / "rgb", "MVTec3D train")
    ]
    train += [ImageRecord(p, 0) for p in list_images(base / "validation" / "good" / "rgb")]
    test = (
        _test_records(base / "test", {"good"}, image_sub="rgb") if (base / "test").is_dir() else []
    )
    test = _attach_masks(
        test, lambda r: base / "test" / r.defect_type / "gt", ("",), required=require_masks
    )
    return CategoryData(category, root, DatasetFormat.MVTEC3D, train, test)


def load_folder(root: Path, category: str, *, require_masks: bool = False) -> CategoryData:
    """``ROOT/CATEGORY/good/`` holds normal images; optional ``defects/<type>/`` anomalous
    ones and ``masks/<type>/<stem>.png`` their masks. The test set's normal images are
    held out of ``good/`` by `load_category` (``test_fraction``)."""
    base = root / category
    good = _require_images(base / "good", "folder layout good images")
    defects = _test_records(base / "defects", set()) if (base / "defects").is_dir() else []
    defects = _attach_masks(
        defects, lambda r: base / "masks" / r.defect_type, ("", "_mask"), required=require_masks
    )
    train = [ImageRecord(p, 0) for p in good]
    return CategoryData(category, root, DatasetFormat.FOLDER, train, defects)


LOADERS = {
    DatasetFormat.MVTEC: load_mvtec,
    DatasetFormat.BTAD: load_btad,
    DatasetFormat.MVTEC3D: load_mvtec3d,
    DatasetFormat.FOLDER: load_folder,
}


DEFAULT_TEST_FRACTION = 0.2


def load_category(
    root: str | Path,
    category: str,
    format: DatasetFormat | str = DatasetFormat.MVTEC,
    *,
    require_masks: bool = False,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> CategoryData:
    """Load one category of a dataset root (the folder that holds ``<category>/``).

    ``require_masks`` refuses anomalous images without a mask (pixel metrics need them);
    by default they are listed with ``mask_path`` None. When the layout has no normal test
    images, ``test_fraction`` of the normal images become the test normals."""
    root = Path(root).expanduser()
    if not (root / category).is_dir():
        raise DatasetError(f"category '{category}' not found under {root}")
    data = LOADERS[DatasetFormat(format)](root, category, require_masks=require_masks)
    base = root / category
    data.train = [with_key(r, base) for r in data.train]
    data.test = [with_key(r, base) for r in data.test]
    if not any(r.label == 0 for r in data.test):
        data.train, held_out = hold_out(data.train, test_fraction, salt="test", min_rest=1)
        data.test = held_out + data.test
    return data


def with_key(record: ImageRecord, base: Path) -> ImageRecord:
    from dataclasses import replace

    try:
        key = record.path.relative_to(base).as_posix()
    except ValueError:
        key = record.path.name
    return replace(record, key=key)


def split_unit(identity: str, salt: str) -> float:
    """An image's place in [0, 1) for one split: a salted hash of its identity alone, so
    each split is an independent draw and no other image can move it."""
    digest = hashlib.sha256(f"{salt}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hold_out(
    records: list[ImageRecord], fraction: float, *, salt: str, min_rest: int = 1
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(rest, held out): each record is held out when its ``split_unit`` is below
    ``fraction``: about that share, the exact count varying with the names.

    The choice depends on each image's identity alone (no random state, no count), so a
    data version always splits the same way and adding or removing images never moves
    another one. Fewer than ``min_rest`` left is an error that says what to do."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    is_held = [split_unit(r.identity, salt) < fraction for r in records]
    held = [r for r, h in zip(records, is_held, strict=True) if h]
    rest = [r for r, h in zip(records, is_held, strict=True) if not h]
    if len(rest) < min_rest:
        raise DatasetError(
            f"{len(records)} images: the {salt} hold-out (fraction {fraction:g}) leaves "
            f"{len(rest)}, at least {min_rest} needed: add images"
        )
    return rest, held


def split_validation(
    records: list[ImageRecord], fraction: float, *, min_train: int = 1, min_val: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, validation): about ``fraction`` of the normal training images, each chosen
    by its own identity. ``min_val`` validation images are required, with an error that
    says how many images or which fraction would do."""
    if len(records) < min_train:
        raise DatasetError(f"{len(records)} training images; at least {min_train} are needed")
    train, val = hold_out(records, fraction, salt="validation", min_rest=min_train)
    if len(val) < min_val:
        raise DatasetError(validation_shortfall(len(val), len(records), fraction, min_val))
    return train, val


DEFAULT_CHOICE_FRACTION = 0.3


def split_roles(
    validation: list[ImageRecord], choice_fraction: float = DEFAULT_CHOICE_FRACTION
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(choice, calibration): the validation normals that make choices (epoch, level
    weights, recipe) and the disjoint ones that set the threshold alone. Scores of images
    a choice was made on are no longer exchangeable with new normals; the calibration
    part's are, so the threshold's promise holds whatever was chosen."""
    if not 0 <= choice_fraction < 1:
        raise ValueError(f"choice fraction must be in [0, 1), got {choice_fraction}")
    calibration, choice = hold_out(validation, choice_fraction, salt="choice", min_rest=0)
    return choice, calibration


# ``--val-fraction auto``: at least the method's share, at most a third of the normals
AUTO_VAL_FRACTION_RANGE = (0.1, 1 / 3)


def validation_fraction_for(
    records: list[ImageRecord],
    calibration_normals: int,
    choice_fraction: float = DEFAULT_CHOICE_FRACTION,
    *,
    bounds: tuple[float, float] = AUTO_VAL_FRACTION_RANGE,
) -> float:
    """The smallest validation fraction (in hundredths, within ``bounds``) whose
    calibration part holds ``calibration_normals`` of ``records``: the splits are by
    identity, so a larger fraction only moves images from training to validation. Counts
    alone decide it, no score."""
    low, high = bounds
    units = sorted(
        split_unit(r.identity, "validation")
        for r in records
        if split_unit(r.identity, "choice") >= choice_fraction  # would calibrate
    )
    if calibration_normals <= 0:
        return low
    if len(units) < calibration_normals:
        return high
    needed = math.floor(units[calibration_normals - 1] * 100) / 100 + 0.01
    return round(min(high, max(low, needed)), 4)


def describe_splits(
    data: CategoryData,
    val_fraction: float,
    choice_fraction: float = DEFAULT_CHOICE_FRACTION,
) -> dict:
    """Every image's split by identity (``fod data splits``): what the model trains on,
    chooses on, calibrates on and is tested on."""
    train, val = split_validation(data.train, val_fraction, min_train=0)
    choice, calibration = split_roles(val, choice_fraction)
    return {
        "category": data.name,
        "format": data.format.value,
        "val_fraction": val_fraction,
        "choice_fraction": choice_fraction,
        "train": sorted(r.identity for r in train),
        "validation": {
            "choice": sorted(r.identity for r in choice),
            "calibration": sorted(r.identity for r in calibration),
        },
        "test_normal": sorted(r.identity for r in data.test if r.label == 0),
        "test_anomalous": sorted(r.identity for r in data.test if r.label == 1),
    }


def test_sizes(data: CategoryData) -> dict[str, int]:
    return {
        "test_normal": sum(r.label == 0 for r in data.test),
        "test_anomalous": sum(r.label == 1 for r in data.test),
        "test_masks": sum(r.mask_path is not None for r in data.test if r.label == 1),
    }


def split_sizes(
    data: CategoryData, train: list, val: list, choice: list | None = None
) -> dict[str, int]:
    """The split sizes every record of a run keeps (manifest, report, MLflow); with
    ``choice``, the validation part that made choices (the rest set the threshold)."""
    sizes = {"train": len(train), "validation": len(val)}
    if choice is not None:
        sizes["validation_choice"] = len(choice)
        sizes["validation_calibration"] = len(val) - len(choice)
    return sizes | test_sizes(data)


def validation_shortfall(n_val: int, n_normals: int, fraction: float, min_val: int) -> str:
    """Why a category cannot be validated, with what would fix it (training and the data
    validation step say the same)."""
    advice = (
        f"raise the validation fraction to {min((min_val + 0.5) / max(n_normals, 1), 0.99):.2f}"
    )
    if fraction > 0:
        needed = math.ceil((min_val - 0.5) / fraction)
        advice = f"add normal images (about {needed} at this fraction) or {advice}"
    return (
        f"too few normal images left for validation: {n_val} of {n_normals} training "
        f"normals at val_fraction {fraction:g}, at least {min_val} needed (rule "
        f"min_val_images): {advice}"
    )
