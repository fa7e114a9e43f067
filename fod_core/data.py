"""Dataset layouts: MVTec AD, BTAD, MVTec AD-3D (RGB) and a generic folder of good images.

Every loader returns the same typed records. A held-out validation split of the
*normal training* images serves every choice (model selection, calibration); test
labels are never used for a choice.
"""

from __future__ import annotations

import hashlib
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


def load_mvtec(root: Path, category: str, *, require_masks: bool = True) -> CategoryData:
    base = root / category
    train = [ImageRecord(p, 0) for p in _require_images(base / "train" / "good", "MVTec train")]
    test = _test_records(base / "test", {"good"}) if (base / "test").is_dir() else []
    test = _attach_masks(
        test, lambda r: base / "ground_truth" / r.defect_type, ("_mask", ""), required=require_masks
    )
    return CategoryData(category, root, DatasetFormat.MVTEC, train, test)


def load_btad(root: Path, category: str, *, require_masks: bool = True) -> CategoryData:
    base = root / category
    train = [ImageRecord(p, 0) for p in _require_images(base / "train" / "ok", "BTAD train")]
    test = _test_records(base / "test", {"ok"}) if (base / "test").is_dir() else []
    test = _attach_masks(
        test, lambda r: base / "ground_truth" / "ko", ("", "_mask"), required=require_masks
    )
    return CategoryData(category, root, DatasetFormat.BTAD, train, test)


def load_mvtec3d(root: Path, category: str, *, require_masks: bool = True) -> CategoryData:
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


def load_folder(
    root: Path, category: str, *, test_fraction: float = 0.2, require_masks: bool = False
) -> CategoryData:
    """``ROOT/CATEGORY/good/`` holds normal images; optional ``defects/<type>/`` anomalous
    ones and ``masks/<type>/<stem>.png`` their masks. When defects exist, a deterministic
    ``test_fraction`` of the good images is held out as the test set's normal images."""
    base = root / category
    good = _require_images(base / "good", "folder layout good images")
    defects = _test_records(base / "defects", set()) if (base / "defects").is_dir() else []
    defects = _attach_masks(
        defects, lambda r: base / "masks" / r.defect_type, ("", "_mask"), required=require_masks
    )
    test_normal: list[Path] = []
    if defects:
        ranked = sorted(good, key=lambda p: _stable_rank(p.name))
        n_test = max(1, round(len(good) * test_fraction))
        test_normal = sorted(ranked[:n_test])
        good = sorted(ranked[n_test:])
    train = [ImageRecord(p, 0) for p in good]
    test = [ImageRecord(p, 0) for p in test_normal] + defects
    return CategoryData(category, root, DatasetFormat.FOLDER, train, test)


LOADERS = {
    DatasetFormat.MVTEC: load_mvtec,
    DatasetFormat.BTAD: load_btad,
    DatasetFormat.MVTEC3D: load_mvtec3d,
    DatasetFormat.FOLDER: load_folder,
}


def load_category(
    root: str | Path,
    category: str,
    format: DatasetFormat | str = DatasetFormat.MVTEC,
    *,
    require_masks: bool | None = None,
) -> CategoryData:
    """Load one category of a dataset root (the folder that holds ``<category>/``).

    ``require_masks`` (default: the layout's own rule) set to False lists anomalous
    images without masks instead of refusing them, so validation can report them all."""
    root = Path(root).expanduser()
    if not (root / category).is_dir():
        raise DatasetError(f"category '{category}' not found under {root}")
    options = {} if require_masks is None else {"require_masks": require_masks}
    return LOADERS[DatasetFormat(format)](root, category, **options)


def _stable_rank(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _unit_hash(name: str) -> float:
    return int(_stable_rank(name)[:12], 16) / 16**12


def split_validation(
    records: list[ImageRecord], fraction: float, *, min_train: int = 1
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out normal training images for validation by a hash of the file name: each
    image's side is fixed by its name alone, so adding images never moves one between
    the splits (cached work and earlier scores stay comparable)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if len(records) < min_train:
        raise DatasetError(f"{len(records)} training images; at least {min_train} are needed")
    val = [r for r in records if _unit_hash(r.path.name) < fraction]
    if fraction > 0 and not val and len(records) > min_train:
        val = [min(records, key=lambda r: _unit_hash(r.path.name))]
    while len(records) - len(val) < min_train:
        val.remove(max(val, key=lambda r: _unit_hash(r.path.name)))
    held_out = set(val)
    return [r for r in records if r not in held_out], [r for r in records if r in held_out]
