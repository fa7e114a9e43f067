"""Dataset layouts: MVTec AD, BTAD, MVTec AD-3D (RGB) and a generic folder of good images.

Every loader returns the same typed records. Three disjoint sets of images exist:
- test: the layout's test images; when the layout has no normal test images (a folder
  of good parts), a ``test_fraction`` of the normal images is held out as test normals,
  so a false-alarm rate can always be measured on images no choice has seen;
- validation: a ``val_fraction`` of the remaining normal images, which every choice
  (best epoch, level weights, threshold) uses;
- train: the rest. Test labels are never used for a choice.

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
    if not any(r.label == 0 for r in data.test):
        data.train, held_out = hold_out(data.train, test_fraction, salt="test", min_rest=1)
        data.test = held_out + data.test
    return data


def _hash_rank(name: str, salt: str) -> str:
    """A file name's place in a salted hash order: each split draws with its own salt, so
    the test hold-out and the validation split are independent draws."""
    return hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()


def hold_out(
    records: list[ImageRecord], fraction: float, *, salt: str, min_rest: int = 1
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(rest, held out): the ``round(len * fraction)`` records first in the salted hash
    order of their file names (at least one when ``fraction`` > 0), keeping ``min_rest``.

    The choice depends on the names alone (no random state), so a data version always
    splits the same way; adding images moves at most a few from the held-out side."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    count = round(len(records) * fraction)
    if fraction > 0:
        count = max(count, 1)
    count = max(0, min(count, len(records) - min_rest))
    ranked = sorted(records, key=lambda r: _hash_rank(r.path.name, salt))
    held = set(ranked[:count])
    return [r for r in records if r not in held], [r for r in records if r in held]


def split_validation(
    records: list[ImageRecord], fraction: float, *, min_train: int = 1, min_val: int = 0
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, validation): ``fraction`` of the normal training images (plus or minus one)
    held out for every choice. ``min_val`` validation images are required, with an error
    that says how many images or which fraction would do."""
    if len(records) < min_train:
        raise DatasetError(f"{len(records)} training images; at least {min_train} are needed")
    train, val = hold_out(records, fraction, salt="validation", min_rest=min_train)
    if len(val) < min_val:
        raise DatasetError(validation_shortfall(len(val), len(records), fraction, min_val))
    return train, val


def test_sizes(data: CategoryData) -> dict[str, int]:
    return {
        "test_normal": sum(r.label == 0 for r in data.test),
        "test_anomalous": sum(r.label == 1 for r in data.test),
        "test_masks": sum(r.mask_path is not None for r in data.test if r.label == 1),
    }


def split_sizes(data: CategoryData, train: list, val: list) -> dict[str, int]:
    """The split sizes every record of a run keeps (manifest, report, MLflow)."""
    return {"train": len(train), "validation": len(val), **test_sizes(data)}


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
